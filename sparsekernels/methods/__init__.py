"""Sparse-training methods: WHEN and WHICH weights move. They call ``topology`` and ``nn``,
never a kernel directly."""

from .acdc import ACDC
from .base import SparseTrainingMethod
from .batchnorm import recalibrate_batchnorm
from .cram import CrAM, one_shot_prune
from .gap import GaP
from .gmp import GMP
from .lottery import LotteryTicket
from .freetickets import EDST, DSTEnsemble
from .masked_reference import MaskedDenseRigL
from .registry import available_methods, get_method, register_method
from .rigl import RigL
from .schedules import ALLR, CLR, FT, LRW, SLR, cosine_drop_fraction, gmp_sparsity, lr_trace
from .set_method import SET
from .srste import SRSTE
from .static import Static
from .supermask import LearnedSupermask, mask_initial_weights
from .suptickets import SupTickets, superpose_states

__all__ = ["SparseTrainingMethod", "RigL", "SET", "GMP", "Static", "MaskedDenseRigL", "SRSTE", "ACDC", "GaP", "cosine_drop_fraction",
           "gmp_sparsity", "get_method", "register_method", "available_methods", "EDST", "DSTEnsemble",
           "recalibrate_batchnorm", "CrAM", "one_shot_prune", "SupTickets", "superpose_states",
           "LotteryTicket", "LearnedSupermask", "mask_initial_weights", "FT", "LRW", "SLR", "CLR", "ALLR", "lr_trace"]
