"""lm-eval task definitions (YAML) for compress; installed as the package data of `compress.lm_tasks`."""
