"""Functional, sharded trainer for converted models; importable on its own.

Example:
    >>> from trainers import Trainer, TrainConfig, adamw, token_cross_entropy
"""
from trainers.config import TrainConfig
from trainers.distributed import maybe_initialize as initialize_distributed
from trainers.loss_scale import LossScale
from trainers.losses import (classification_cross_entropy, mean_pooled, model_loss, mse, pair_contrastive,
                             token_cross_entropy)
from trainers.optim import adamw, decay_mask, skip_frozen
from trainers.sharding import TENSOR_RULES, make_mesh, param_shardings, param_specs, replication_report
from trainers.state import TrainState
from trainers.step import make_eval_step, make_forward, make_train_step
from trainers.torch_optim import load_torch_optimizer, torch_optimizer_state
from trainers.trainer import Trainer

__all__ = ["TrainConfig", "LossScale", "load_torch_optimizer", "torch_optimizer_state", "initialize_distributed", "Trainer", "TrainState", "adamw", "decay_mask", "skip_frozen", "model_loss", "token_cross_entropy",
           "classification_cross_entropy", "mse", "mean_pooled", "pair_contrastive", "TENSOR_RULES", "make_mesh", "param_shardings", "param_specs",
           "replication_report", "make_train_step", "make_eval_step", "make_forward"]
