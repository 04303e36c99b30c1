"""AttnRes models and layer specs."""
