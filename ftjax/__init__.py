"""ftjax: fine-tune pretrained language models in JAX/Flax.

The public API in one namespace (`import ftjax as fj`); see the README's "Use ftjax as a
library". The submodules stay importable for what this namespace does not lift:

    model = fj.load_model(path, fj.PeftConfig(method="lora"), trainable=rules)
    params, frozen = model.split()
    step = fj.make_train_step(my_loss, optax.adamw(1e-3))
    fj.save_adapter(model, state.params, out_dir)

Partitions and forgetting: `PartitionRule` rules (`load_model(..., rules=[...])`, see
ftjax.rules), LISA and sparse updates as Optax wrappers (`lisa`, `sparse`), L2-SP and EWC as
Optax transforms (`l2sp`, `ewc`, `fisher`), and the invariant checks of ftjax.invariants.

Many adapters: `load_model(path, PeftConfig(adapters={"math": NamedLoraConfig(...), ...}))`
(or `load_adapters(path, {"math": DIR, ...})` for HF PEFT adapters) builds one frozen base with
named LoRA / DoRA adapters; batches carry each row's adapter index as `adapter` (rows, 1), and
`adapter_rows(ids)` routes a direct `module.apply` inside a jitted function (see
ftjax.peft.multi); `single_adapter` gives one adapter back as a plain LoRA model.

Preference tuning: `preference_loss(PreferenceConfig(...), sequence_logps(model.module))` is a
loss for `make_train_step` over batches of pairs (rows chosen, rejected, ...) that carry the
reference's scores as `ref_logps`; `reference_fn` computes them (see ftjax.preference).
"""

from ftjax import (assembly, config, data, dynamic, hf, invariants, loss, models, optim, peft,
                   preference, regularize, rules, step, tree)
from ftjax.assembly import (Model, compute_dtype, load_adapters, load_model, save_adapter,
                            save_merged, single_adapter)
from ftjax.config import (AdapterConfig, Config, DataConfig, IA3Config, LoraConfig,
                          NamedLoraConfig, OptimConfig, PartitionRule, PeftConfig,
                          PreferenceConfig, PrefixConfig, PromptConfig, UserError)
from ftjax.dynamic import lisa, sparse
from ftjax.data import Batches, Example
from ftjax.hf import load_tokenizer
from ftjax.loss import (chunked_cross_entropy, cross_entropy, distillation, logits_fn,
                        regularized)
from ftjax.peft.multi import rows as adapter_rows
from ftjax.preference import loss_fn as preference_loss
from ftjax.preference import reference_fn, sequence_logps
from ftjax.regularize import ewc, fisher, l2sp
from ftjax.step import TrainState, eval_step, init_state, make_train_step, train_step
from ftjax.tree import flatten, label, select, split, unflatten

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "Batches", "Config", "DataConfig", "Example", "IA3Config", "LoraConfig",
    "Model", "NamedLoraConfig", "OptimConfig", "adapter_rows", "load_adapters", "single_adapter",
    "PartitionRule", "PeftConfig", "PreferenceConfig", "PrefixConfig",
    "PromptConfig", "TrainState", "UserError", "assembly", "chunked_cross_entropy",
    "compute_dtype", "config", "cross_entropy", "data", "distillation", "dynamic", "eval_step",
    "ewc", "fisher", "flatten", "hf", "init_state", "invariants", "l2sp", "label", "lisa",
    "load_model", "load_tokenizer", "logits_fn", "loss", "make_train_step", "models", "optim",
    "peft", "preference", "preference_loss", "reference_fn", "regularize", "regularized", "rules",
    "save_adapter", "save_merged", "select", "sequence_logps", "sparse", "split", "step",
    "train_step", "tree", "unflatten",
]
