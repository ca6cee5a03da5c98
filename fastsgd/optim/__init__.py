"""fastsgd optimizers: drop-ins for torch.optim.SGD and timm's Lars, plus LAMB."""
from fastsgd.optim.lamb import LAMB
from fastsgd.optim.lars import LARS
from fastsgd.optim.param_groups import param_groups
from fastsgd.optim.sgd import SGD, Momentum, Nesterov

__all__ = ["SGD", "Momentum", "Nesterov", "LARS", "LAMB", "param_groups"]
