"""The cache's mathematics: when to compute (schedules, placement, calibration files), how to forecast
(forecasters), what is kept (the cache's per-context state, factor stores, offload) and how it is added back
(fused kernels). Knows nothing of models, files or processes; imports nothing else of ``taylorseer``."""
