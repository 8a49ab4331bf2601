"""The fast tier: tree selection, optimizer groups, sharding rules, the step and the losses on
synthetic parameters (no model directory, no HF), and the package's one-way imports."""

import ast
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ftjax as fj
from ftjax import loss, models, optim, sharding, step, tree
from ftjax.models import common, layers
from ftjax.config import LrGroup, MeshConfig, OptimConfig, UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["embed_tokens/embedding", "layers_0/self_attn/q_proj/kernel",
         "layers_0/self_attn/q_proj/lora_a", "layers_0/input_layernorm/scale",
         "layers_1/mlp/up_proj/kernel", "layers_1/mlp/up_proj/bias", "norm/scale",
         "lm_head/kernel"]


# ---- tree: one selection utility ------------------------------------------------------------

def test_label_first_match_wins_and_default_covers_the_rest():
  labels = tree.label([(r"lora_", "adapter"), (r"^layers_0/", "layer0"), (r"kernel$", "kernel")],
                      PATHS, "rules", default="other")
  assert labels["layers_0/self_attn/q_proj/lora_a"] == "adapter"  # before ^layers_0/
  assert labels["layers_0/self_attn/q_proj/kernel"] == "layer0"  # before kernel$
  assert labels["layers_1/mlp/up_proj/kernel"] == "kernel"
  assert labels["norm/scale"] == "other"
  assert list(labels) == PATHS


@pytest.mark.parametrize("rules,needle", [
    ([("nothing_here", 1)], "rules: pattern 'nothing_here' matches no parameter"),
    ([("layers_(", 1)], "rules: 'layers_(' is not a valid regex"),
    ([("kernel$", 1)], "rules: parameter 'embed_tokens/embedding' is covered by no rule"),
])
def test_label_errors_name_the_pattern_or_path(rules, needle):
  with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("$", r"\$")):
    tree.label(rules, PATHS, "rules")


def test_select_accepts_functions_regexes_and_ordered_rules():
  assert tree.select(lambda p: p.endswith("scale"), PATHS) == {"layers_0/input_layernorm/scale",
                                                               "norm/scale"}
  assert tree.select("^lm_head/", PATHS) == {"lm_head/kernel"}
  assert tree.select(["bias$", "lora_"], PATHS) == {"layers_1/mlp/up_proj/bias",
                                                     "layers_0/self_attn/q_proj/lora_a"}
  chosen = tree.select([("^layers_0/.*lora", True), ("^layers_0/", False), ("kernel$", True)],
                       PATHS)
  assert chosen == {"layers_0/self_attn/q_proj/lora_a", "layers_1/mlp/up_proj/kernel",
                    "lm_head/kernel"}
  assert tree.match(["norm", "scale$"], PATHS, "x") == {"layers_0/input_layernorm/scale",
                                                         "norm/scale"}  # union, overlaps fine


def test_split_and_merge_round_trip():
  params = tree.unflatten({p: np.full((2,), i, np.float32) for i, p in enumerate(PATHS)})
  train, frozen = tree.split(params, {"norm/scale", "lm_head/kernel"})
  assert set(tree.flatten(train)) == {"norm/scale", "lm_head/kernel"}
  merged = tree.flatten(tree.merge(train, frozen))
  assert all(np.array_equal(merged[p], tree.flatten(params)[p]) for p in PATHS)


# ---- optim: groups through the same rules ---------------------------------------------------

def test_lr_groups_first_match_layer_decay_and_loraplus():
  cfg = OptimConfig(lr=0.1, layer_decay=0.5, loraplus_ratio=4.0,
                    lr_groups=[LrGroup("^lm_head/", 1.0), LrGroup("kernel$", 0.2)])
  family = models.for_model_type("llama")
  paths = PATHS + ["layers_0/self_attn/q_proj/lora_b"]
  m = optim.lr_multipliers(cfg, paths, 2, family)
  assert m["lm_head/kernel"] == pytest.approx(10.0)  # first group wins; depth 3 of 2: 0.5**0
  assert m["layers_1/mlp/up_proj/kernel"] == pytest.approx(2.0 * 0.5)  # depth 2
  assert m["layers_0/self_attn/q_proj/kernel"] == pytest.approx(2.0 * 0.25)  # depth 1
  assert m["embed_tokens/embedding"] == pytest.approx(0.5**3)  # depth 0
  assert m["layers_0/self_attn/q_proj/lora_b"] == pytest.approx(0.25 * 4)
  with pytest.raises(UserError, match=r"optim.lr_groups\[0\]: pattern '\^gate' selects no"):
    optim.lr_multipliers(OptimConfig(lr_groups=[LrGroup("^gate", 1.0)]), PATHS, 2, family)


@pytest.mark.parametrize("family", [f.name for f in models.FAMILIES])
def test_default_no_decay_exempts_norms_biases_and_embeddings_in_every_family(family):
  fam = next(f for f in models.FAMILIES if f.name == family)
  paths = [ours.replace("{i}", "0") for _, ours, _ in fam.table]
  params = tree.unflatten({p: np.zeros(2) for p in paths})
  decayed = {p for p, d in tree.flatten(optim.decay_mask(OptimConfig(), params)).items() if d}
  for p in paths:
    exempt = fam.kind(p) in ("norm", "embedding") or p.endswith("bias")
    assert (p not in decayed) == exempt, p


def test_decoupled_weight_decay_skips_masked_leaves():
  params = {"w": {"kernel": jnp.ones(3)}, "n": {"scale": jnp.ones(3)}}
  cfg = OptimConfig(name="sgd", lr=0.5, weight_decay=0.1, clip_norm=0.0, schedule="constant")
  tx, _ = optim.build(cfg, 10, params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["w"]["kernel"], -0.5 * 0.1 * np.ones(3), rtol=1e-6)
  np.testing.assert_allclose(updates["n"]["scale"], np.zeros(3))


# ---- sharding rules ---------------------------------------------------------------------------

def test_logical_axes_map_to_mesh_axes_only_where_they_divide():
  mesh = dict(sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)).shape)
  assert mesh == sharding.mesh_axes(MeshConfig(data=2, fsdp=2, tensor=2), 8)
  P = jax.sharding.PartitionSpec
  assert sharding._spec(P("embed", "heads"), (64, 32), mesh) == P("fsdp", "tensor")
  assert sharding._spec(P("vocab", "embed"), (321, 64), mesh) == P(None, "fsdp")  # 321 odd
  assert sharding._spec(P("embed", "embed"), (64, 64), mesh) == P("fsdp", None)  # once per axis
  assert sharding._spec(P("norm"), (64,), mesh) == P(None)
  assert sharding.mesh_shape(MeshConfig(data=-1, tensor=2), 8) == (4, 1, 2)
  with pytest.raises(UserError, match="does not divide the 8 devices"):
    sharding.mesh_shape(MeshConfig(data=3), 8)


# ---- losses and the step, on a synthetic linear "model" -------------------------------------

V, D = 11, 6


def _apply(params, batch, rng=None):
  del rng
  h = jax.nn.one_hot(batch["tokens"], V) @ params["embed"]
  return h @ params["head"]


def _batch(rows=4, length=7, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, V, (rows, length)).astype(np.int32)
  lengths = rng.integers(2, length + 1, rows)
  seg = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return {"tokens": tokens, "positions": np.broadcast_to(np.arange(length), tokens.shape),
          "segment_ids": seg, "loss_mask": seg.copy()}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"embed": jnp.asarray(rng.normal(size=(V, D)), jnp.float32),
          "head": jnp.asarray(rng.normal(size=(D, V)), jnp.float32)}


def test_token_losses_equal_a_hand_computed_cross_entropy():
  params, batch = _params(), _batch()
  logits = np.asarray(_apply(params, batch), np.float64)
  nll, weights, _ = loss.token_losses(jnp.asarray(logits, jnp.float32), batch)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = sum(-logp[b, t, batch["tokens"][b, t + 1]]
             for b in range(4) for t in range(6) if batch["segment_ids"][b, t + 1])
  assert float(nll.sum()) == pytest.approx(want, rel=1e-5)
  assert float(weights.sum()) == float((batch["segment_ids"][:, 1:]).sum())


@pytest.mark.parametrize("softcap", [None, 0.5])
def test_chunked_cross_entropy_equals_whole_logits_in_value_and_gradient(softcap):
  """Also with Gemma's final-logit soft-cap (0.5 bends every logit: far from tanh's linear
  range), whose gradient the chunked head computes by hand."""
  params, batch = _params(), _batch(rows=3, length=9)
  hidden = lambda p, b, rng=None: (jax.nn.one_hot(b["tokens"], V) @ p["embed"], p["head"])
  whole = loss.cross_entropy(lambda p, b, rng=None: layers.soft_cap(_apply(p, b), softcap))
  chunked = loss.chunked_cross_entropy(loss.ChunkedLoss(hidden, chunk=5, softcap=softcap))
  (l1, a1), g1 = jax.value_and_grad(whole, has_aux=True)(params, batch)
  (l2, a2), g2 = jax.value_and_grad(chunked, has_aux=True)(params, batch)
  assert float(l1) == pytest.approx(float(l2), rel=1e-6) and float(a1["tokens"]) == a2["tokens"]
  for k in params:
    np.testing.assert_allclose(g1[k], g2[k], rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_skips_untrained_positions_exactly():
  """Answer-only rows (prompts and padding untrained) and a batch that trains nothing: the
  chunked head's loss and gradients equal whole logits' (chunks of untrained positions skip the
  head, and trained positions are moved to the front of their rows first)."""
  params, batch = _params(), _batch(rows=3, length=40)
  mask = np.zeros((3, 40), np.int32)
  for row, spans in enumerate([[(5, 9), (20, 26)], [(30, 40)], [(2, 3)]]):
    for a, b in spans:
      mask[row, a:b] = 1
  batch["segment_ids"] = np.ones((3, 40), np.int32)
  hidden = lambda p, b, rng=None: (jax.nn.one_hot(b["tokens"], V) @ p["embed"], p["head"])
  whole = loss.cross_entropy(_apply)
  chunked = loss.chunked_cross_entropy(loss.ChunkedLoss(hidden, chunk=24))  # 8 per row
  for m in (mask, np.zeros_like(mask)):
    b = {**batch, "loss_mask": m}
    (l1, a1), g1 = jax.value_and_grad(whole, has_aux=True)(params, b)
    (l2, a2), g2 = jax.value_and_grad(chunked, has_aux=True)(params, b)
    assert float(a1["tokens"]) == float(a2["tokens"]) == float(m[:, 1:].sum())
    assert float(l2) == pytest.approx(float(l1), rel=1e-6, abs=1e-6)
    for k in params:
      np.testing.assert_allclose(g2[k], g1[k], rtol=1e-5, atol=1e-6)


def test_step_divides_by_all_tokens_so_accumulation_equals_one_batch():
  params, batch = _params(), _batch(rows=8)
  tx = optax.sgd(0.1)
  fn = loss.cross_entropy(_apply)
  one = step.train_step(step.init_state(params, tx), {}, {k: v[None] for k, v in batch.items()},
                        loss_fn=fn, tx=tx)
  four = fj.make_train_step(fn, tx, grad_accum=4)(step.init_state(params, tx), {}, batch)
  for k in params:
    np.testing.assert_allclose(one[0].params[k], four[0].params[k], rtol=1e-5, atol=1e-6)
  assert float(one[1]["loss"]) == pytest.approx(float(four[1]["loss"]), rel=1e-6)


def test_a_regularised_loss_adds_exactly_its_penalty_per_token():
  params, batch = _params(), _batch(rows=8)
  tx = optax.sgd(1.0)
  penalty = lambda p: jnp.sum(p["head"] ** 2)
  base = loss.cross_entropy(_apply)
  plain = step.train_step(step.init_state(params, tx), {}, {k: v[None] for k, v in
                                                             batch.items()}, loss_fn=base, tx=tx)
  want = float(plain[1]["loss"]) + 0.01 * float(penalty(params))
  reg = fj.make_train_step(loss.regularized(base, penalty, 0.01), tx, grad_accum=2)(
      step.init_state(_params(), tx), {}, batch)  # fresh arrays: the jitted step donates them
  assert float(reg[1]["loss"]) == pytest.approx(want, rel=1e-5)
  # SGD at lr 1: the head moves by the plain gradient plus d(0.01 |head|^2) = 0.02 head
  np.testing.assert_allclose(plain[0].params["head"] - reg[0].params["head"],
                             0.02 * params["head"], rtol=1e-4, atol=1e-6)


def test_the_step_trains_only_what_it_is_given_and_skips_non_finite_updates():
  params = _params()
  train, frozen = {"head": params["head"]}, {"embed": params["embed"]}
  tx = optax.adam(1e-2)
  fn = fj.make_train_step(loss.cross_entropy(_apply), tx)
  state = step.init_state(train, tx)
  state, metrics = fn(state, frozen, _batch())
  assert set(state.params) == {"head"} and int(state.step) == 1
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["loss"]) > 0
  poisoned = {"embed": frozen["embed"].at[0, 0].set(jnp.nan)}
  before = jax.device_get(state.params)
  state, metrics = fn(state, poisoned, _batch())
  assert int(state.skipped) == 1 and not np.isfinite(float(metrics["grad_norm"]))
  np.testing.assert_array_equal(np.asarray(state.params["head"]), before["head"])


# ---- assembly: the partition before the weights ------------------------------------------

def test_load_model_partitions_before_reading_and_keeps_heads_trainable(tiny_llama_dir):
  rule = [(r"lora_", True), (r"^layers_1/.*norm", True)]
  model = fj.load_model(tiny_llama_dir, fj.PeftConfig(method="lora", base_dtype="bf16"),
                        trainable=rule, num_labels=3)
  flat = tree.flatten(model.params)
  assert model.fresh == ["score/kernel"] and "score/kernel" in model.trainable  # always trains
  assert model.trainable == {p for p in flat if "lora_" in p} | {
      "layers_1/input_layernorm/scale", "layers_1/post_attention_layernorm/scale",
      "score/kernel"}
  for p, v in flat.items():  # frozen base weights were read as bf16; what trains is fp32
    assert v.dtype == (jnp.float32 if p in model.trainable else jnp.bfloat16), p
  fp32 = tree.flatten(fj.load_model(tiny_llama_dir).params)
  np.testing.assert_array_equal(np.asarray(flat["norm/scale"], np.float32),
                                np.asarray(fp32["norm/scale"].astype(jnp.bfloat16), np.float32))


def test_with_peft_builds_what_load_model_builds(tiny_llama_dir):
  cfg = fj.PeftConfig(method="ia3")
  direct = fj.load_model(tiny_llama_dir, cfg, seed=3)
  base = fj.load_model(tiny_llama_dir)
  added = base.with_peft(cfg, seed=3)
  assert added.trainable == direct.trainable and added.spec == direct.spec
  one, two = tree.flatten(added.params), tree.flatten(direct.params)
  assert set(one) == set(two) and all(np.array_equal(one[p], two[p]) for p in one)
  batch = {k: jnp.asarray(v[:2, :12]) for k, v in _batch(4, 12).items()}
  np.testing.assert_allclose(added.apply(added.params, batch), base.apply(base.params, batch),
                             atol=1e-6)  # (IA)^3 starts as the identity
  narrowed = added.with_trainable(r"mlp/down_proj/ia3_l$")
  assert narrowed.trainable == {p for p in one if p.endswith("mlp/down_proj/ia3_l")}


def test_soft_prompts_start_from_the_fp32_embedding_rows_under_a_bf16_base(tiny_llama_dir):
  cfg = fj.PeftConfig(method="prompt", base_dtype="bf16",
                      prompt=fj.PromptConfig(length=4, init="vocab"))
  model = fj.load_model(tiny_llama_dir, cfg)
  flat, fp32 = tree.flatten(model.params), tree.flatten(fj.load_model(tiny_llama_dir).params)
  assert flat["embed_tokens/embedding"].dtype == jnp.bfloat16
  soft, table = np.asarray(flat["prompt/embedding"]), np.asarray(fp32["embed_tokens/embedding"])
  assert all(any(np.array_equal(row, t) for t in table) for row in soft)


# ---- one-way imports ------------------------------------------------------------------------

def _imports(path: str, module: str, modules: set[str]) -> set[str]:
  """The ftjax modules `module` imports (anywhere in the file, lazily or not)."""
  out = set()
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([base] if base else []))
      for a in node.names:
        name = f"{base}.{a.name}"
        out.add(name if name in modules else base)
  return {m for m in out if m in modules and m != module}


@pytest.mark.parametrize("scale,softcap", [(None, None), (0.2, 0.5)])
def test_attention_backward_equals_autodiff_of_softmax_attention(scale, softcap):
  """The hand-written attention backward against autodiff of the plain softmax einsums: grouped
  heads, packed segments and fully masked (padding) rows, whose outputs are weighted too; with
  Gemma's score scale and soft-capping (a cap of 0.5 bends every score: tanh is far from
  linear there)."""
  b, l, h, kv, d = 2, 6, 4, 2, 8
  q, k, v, w = (jax.random.normal(jax.random.PRNGKey(i), s) for i, s in enumerate(
      [(b, l, h, d), (b, l, kv, d), (b, l, kv, d), (b, l, h, d)]))
  seg = jnp.array([[0, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
  causal = jnp.tril(jnp.ones((l, l), bool))
  mask = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & causal)[:, None]

  def objective(dropout):
    return lambda q, k, v: jnp.sum(w * layers.dot_product_attention(q, k, v, mask, dropout,
                                                                    scale, softcap))
  ours = jax.value_and_grad(objective(None), argnums=(0, 1, 2))(q, k, v)
  plain = jax.value_and_grad(objective(lambda p: p), argnums=(0, 1, 2))(q, k, v)  # einsum path
  np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
  for a, e in zip(ours[1], plain[1]):
    np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)


def test_cudnn_attention_gives_way_to_xla_where_scores_are_soft_capped():
  said = []
  handler = logging.Handler()
  handler.emit = lambda record: said.append(record.getMessage())
  common.logger.addHandler(handler)  # (a run in this process stops ftjax's logs propagating)
  try:
    assert common.attention_impl("cudnn", jnp.bfloat16, packing=False) == "cudnn"
    assert common.attention_impl("cudnn", jnp.bfloat16, packing=False, softcap=12.5) == "xla"
    assert common.attention_impl("cudnn", jnp.bfloat16, packing=False, softcap=12.5) == "xla"
  finally:
    common.logger.removeHandler(handler)
  assert len(said) == 1 and "soft-cap" in said[0] and "12.5" in said[0]  # once
  assert common.attention_impl("xla", jnp.bfloat16, packing=False, softcap=50.0) == "xla"


def test_imports_are_acyclic():
  files = {}
  for root, _, names in os.walk(os.path.join(REPO, "ftjax")):
    for n in names:
      if n.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, n), REPO)[:-3].replace(os.sep, ".")
        files[rel.removesuffix(".__init__")] = os.path.join(root, n)
  graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
  assert graph["ftjax.train"] >= {"ftjax.assembly", "ftjax.loss"}  # the parser sees imports
  state: dict[str, int] = {}

  def visit(m, stack):
    state[m] = 1
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
      if not state.get(n):
        visit(n, stack + [n])
    state[m] = 2

  for m in sorted(graph):
    if not state.get(m):
      visit(m, [m])
