"""Training for fcos-d2: config keys, dataset setup and checks, launch (NCCL or gloo), trainer, hooks."""
