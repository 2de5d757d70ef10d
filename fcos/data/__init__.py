"""Dataset tools: the embedded synthetic shapes dataset, VOC -> COCO conversion, the COCO checker.

Used by the command lines in ``dataset/`` and by ``fcos.engine`` before training; independent of the
training engine.
"""
