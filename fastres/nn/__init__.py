"""Drop-in modules over fastres's fused ops."""
from fastres.nn.batch_norm_act import BatchNormAct2d, ConvBNAct2d, ResidualAct
from fastres.nn.pool import MaxPool2d
from fastres.nn.resnet_blocks import BasicBlock, Bottleneck, TimmBasicBlock, TimmBottleneck

__all__ = ["BatchNormAct2d", "ConvBNAct2d", "ResidualAct", "BasicBlock", "Bottleneck",
           "TimmBasicBlock", "TimmBottleneck", "MaxPool2d"]
