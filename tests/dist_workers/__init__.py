"""Worker scripts of the multi-process tests (run under torchrun by :mod:`dist_workers.common`) and their harness."""
