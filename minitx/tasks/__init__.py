"""Training tasks: each class says what its model, data, loss and metrics are, and how minitx-train wires it
(minitx.tasks.base.Task). `task=<name>` picks one from TASKS, `task=package.module:Class` one defined elsewhere;
adding a task is one class plus an experiment file."""

from minitx.tasks.base import TASKS, NonFiniteError, Prepared, Task, adamw, lr_at, register_task, task_class
from minitx.tasks.causal_lm import CausalLM
from minitx.tasks.classify import SequenceClassifier
from minitx.tasks.masked_lm import MaskedLM, mask_tokens

__all__ = ["TASKS", "CausalLM", "MaskedLM", "NonFiniteError", "Prepared", "SequenceClassifier", "Task", "adamw",
           "lr_at", "mask_tokens", "register_task", "task_class"]
