"""Training and evaluation machinery for FCOS on detectron2 (the applications' shared part).

Config keys of the training application, dataset registration and checks, launch (NCCL or gloo),
the trainer and its hooks, COCO evaluation, the training-curve plot, and the config/model set-up the
demo and export tools share. Depends on the model part of ``fcos`` and on ``fcos.data``, never the
other way round.
"""
