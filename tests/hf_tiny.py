"""Tiny random Hugging Face models, built with transformers' own classes: the oracle for interop tests.

Every architecture gets a config small enough to run on CPU in well under a second, yet with each
feature that moekit must reproduce switched on (sliding window shorter than the test sequence,
shared-expert gate, dense layers between MoE layers, QK-norm, MLA with YaRN, group-limited routing).
``randomize`` then replaces the weights that transformers initializes to 0 or 1 (biases, norms,
DeepSeek-V3's selection bias) with random values, so a tensor loaded into the wrong place, or not
at all, changes the logits.
"""

from __future__ import annotations

import torch

SEQ = 20  # prompt length: longer than the sliding windows below
NEW_TOKENS = 16
VOCAB = 96


def _common(**kw) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
                initializer_range=0.2, tie_word_embeddings=False)
    return {**base, **kw}


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**_common(intermediate_size=24, num_hidden_layers=2, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2, sliding_window=6))
    return MixtralForCausalLM(cfg)


def qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**_common(intermediate_size=40, num_hidden_layers=3, num_key_value_heads=2,
                                   moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=6,
                                   num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                   mlp_only_layers=[1], qkv_bias=True))
    return Qwen2MoeForCausalLM(cfg)


def qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**_common(intermediate_size=40, num_hidden_layers=4, num_key_value_heads=2, head_dim=12,
                                   moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                   norm_topk_prob=True, decoder_sparse_step=2))
    return Qwen3MoeForCausalLM(cfg)


def olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(**_common(intermediate_size=16, num_hidden_layers=2, num_key_value_heads=2,
                                num_experts=8, num_experts_per_tok=3))
    return OlmoeForCausalLM(cfg)


def deepseek_v3(q_lora_rank: int | None = 16, rope_interleave: bool = True):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    cfg = DeepseekV3Config(**_common(intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
                                     num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                                     routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=q_lora_rank,
                                     qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_group=4, topk_group=2,
                                     num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=True,
                                     rope_parameters=yarn, rope_interleave=rope_interleave))
    return DeepseekV3ForCausalLM(cfg)


def deepseek_v2(lite: bool = False):
    """V2: group-limited greedy (groups ranked by their best expert), routed scaling 16, q latent;
    V2-Lite: greedy top-k, full-rank q, scaling 1."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
                beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)
    routing = (dict(topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, q_lora_rank=None)
               if lite else dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                 routed_scaling_factor=16.0, q_lora_rank=16))
    cfg = DeepseekV2Config(**_common(intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=3,
                                     num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8,
                                     kv_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8,
                                     num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=False,
                                     rope_parameters=yarn, **routing))
    return DeepseekV2ForCausalLM(cfg)


def deepseek_v4(moe_intermediate_size: int = 16):
    """Layers: HCA (windows of 4), CSA (windows of 2, the indexer keeping 3 of up to 10 entries),
    sliding only, CSA; layer 0 hash-routed; 2 hyper-connection streams; a swiglu_limit the random
    activations cross; a sliding window shorter than SEQ; YaRN on the compress RoPE (beyond 16
    positions). What transformers initializes to constants
    (the hyper-connection biases and scales, the hash table) is set at random here."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(**_common(moe_intermediate_size=moe_intermediate_size, num_hidden_layers=4, head_dim=16, q_lora_rank=12,
                                     partial_rotary_factor=0.5, num_experts_per_tok=2, n_routed_experts=4, o_groups=2,
                                     o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=3, sliding_window=6,
                                     compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
                                     layer_types=["heavily_compressed_attention", "compressed_sparse_attention",
                                                  "sliding_attention", "compressed_sparse_attention"],
                                     mlp_layer_types=["hash_moe", "moe", "moe", "moe"], hc_mult=2, swiglu_limit=1.0,
                                     rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                          beta_fast=32.0, beta_slow=1.0)))
    model = DeepseekV4ForCausalLM(cfg)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("hc.base", "hc_base")):
                t.normal_(std=0.5)
            elif name.endswith(("hc.scale", "hc_scale")):
                t.copy_(1 + 0.3 * torch.randn_like(t))
            elif name.endswith("tid2eid"):  # each token id: 2 distinct experts of 4
                t.copy_(torch.rand(t.shape[0], cfg.n_routed_experts).argsort(-1)[:, : cfg.num_experts_per_tok])
    return model


def gpt_oss(intermediate_size: int = 16):
    from transformers import GptOssConfig, GptOssForCausalLM

    # A swiglu_limit small enough that the clamp binds on these random activations.
    yarn = dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, original_max_position_embeddings=16,
                beta_fast=32.0, beta_slow=1.0, truncate=False)
    cfg = GptOssConfig(**_common(intermediate_size=intermediate_size, num_hidden_layers=3, num_key_value_heads=2, head_dim=12,
                                 num_local_experts=6, num_experts_per_tok=2, sliding_window=6, swiglu_limit=1.5,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                 rope_parameters=yarn))
    return GptOssForCausalLM(cfg)


def llama4_text_config(**kw):
    """MoE on layers 1 and 3 (dense 0 and 2), layer 3 without RoPE (global, temperature-tuned),
    chunks of 6 < SEQ on the others, L2 QK norm, Llama 3 RoPE scaling."""
    from transformers import Llama4TextConfig

    llama3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=16)
    return Llama4TextConfig(**_common(intermediate_size=16, intermediate_size_mlp=40, num_hidden_layers=4,
                                      num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
                                      interleave_moe_layer_step=2, no_rope_layer_interval=4, attention_chunk_size=6,
                                      floor_scale=4, attn_scale=0.5, use_qk_norm=True, rope_parameters=llama3), **kw)


def llama4():
    from transformers import Llama4ForCausalLM

    return Llama4ForCausalLM(llama4_text_config())


def llama4_multimodal():
    """The same language model inside Llama4ForConditionalGeneration, with a minimal vision tower."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5)
    cfg = Llama4Config(text_config=llama4_text_config().to_dict(), vision_config=vision)
    return Llama4ForConditionalGeneration(cfg)


def llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=16)
    cfg = LlamaConfig(**_common(intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2,
                                rope_parameters=llama3, tie_word_embeddings=tie))
    return LlamaForCausalLM(cfg)


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**_common(intermediate_size=48, num_hidden_layers=2, num_key_value_heads=1, sliding_window=5))
    return MistralForCausalLM(cfg)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    linear = dict(rope_type="linear", rope_theta=10000.0, factor=2.0)
    cfg = Qwen2Config(**_common(intermediate_size=48, num_hidden_layers=2, num_key_value_heads=2,
                                rope_parameters=linear))
    return Qwen2ForCausalLM(cfg)


BUILDERS = {
    "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "olmoe": olmoe,
    "deepseek_v3": deepseek_v3,
    # full-rank q projection, rope dims stored half-split (no row permutation on load)
    "deepseek_v3_plain": lambda: deepseek_v3(q_lora_rank=None, rope_interleave=False),
    "gpt_oss": gpt_oss,
    "deepseek_v2": deepseek_v2,
    "deepseek_v4": deepseek_v4,
    "deepseek_v2_lite": lambda: deepseek_v2(lite=True),
    "llama4": llama4,
    "llama": llama, "mistral": mistral, "qwen2": qwen2,
}


@torch.no_grad()
def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values for what transformers sets to constants: norms ~ 1 + N(0, 0.3), biases and
    the routing correction bias ~ N(0, 0.3) (large enough to change which experts win)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() or "inv_freq" in name or "rotary" in name:
            continue
        if "norm" in name:
            t.copy_(1 + 0.3 * torch.randn_like(t))
        elif name.endswith(("bias", "e_score_correction_bias", "sinks")):
            t.copy_(0.3 * torch.randn_like(t))
    return model.eval()


def build(arch: str, **kw) -> torch.nn.Module:
    """``kw``: the builder's own widths (gpt_oss's ``intermediate_size``, deepseek_v4's
    ``moe_intermediate_size``: 32 makes every expert projection int4-quantizable)."""
    return randomize(BUILDERS[arch](**kw))


@torch.no_grad()
def greedy(logits_fn, prompt: torch.Tensor, steps: int = NEW_TOKENS) -> torch.Tensor:
    """The ``steps`` greedy tokens after ``prompt`` [B, S]; ``logits_fn(ids) -> [B, S, V]`` runs the
    whole sequence each step (no cache: the models are compared, not their caches)."""
    ids = prompt
    for _ in range(steps):
        nxt = logits_fn(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt.shape[1]:]


def hf_logits(model):
    return lambda ids: model(input_ids=ids).logits.float()


def mk_logits(model):
    return lambda ids: model(ids).logits.float()
