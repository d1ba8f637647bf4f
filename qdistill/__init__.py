"""qdistill: the helpers under the five commands (distillation, evaluate_retrieval, evaluate_speed, serving,
report). Nothing runs at import time; each module is named for what it holds (README: the module map)."""
