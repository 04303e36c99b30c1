"""``attnres-profile``: step time, memory and pipeline traffic of standard residuals vs AttnRes."""
