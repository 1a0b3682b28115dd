"""The jobs the one loop trains (``hdcli.train.task.Task``): distill, finetune, pretrain, and the supervised
classification step finetune and pretrain share (``classify``)."""
