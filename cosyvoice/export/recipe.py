"""The Qwen2 body configuration of a CosyVoice2/3 LLM, from whatever the user has at hand.

A HyperPyYAML recipe is code (loading it instantiates objects and can run commands), so it is never
*loaded* here: the yaml is parsed with a plain safe parser that keeps tags as data, the
``Qwen2Encoder`` node is found, and its ``config`` (dict of ``Qwen2Config`` fields) or
``pretrain_path`` (a folder with ``config.json``) is read, resolving simple ``!ref <key>`` values.
"""

from __future__ import annotations

import json
import re

import yaml

from cosyvoice import storage

#: Qwen2-0.5B (CosyVoice2-0.5B / Fun-CosyVoice3-0.5B body), used when shapes say it is that model
QWEN2_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True, hidden_act="silu",
)

_REF = re.compile(r"^<([^<>]+)>$")


class _TaggedLoader(yaml.SafeLoader):
    """Safe loader that builds tagged nodes as their plain mapping/sequence/scalar value."""


def _plain(loader: yaml.SafeLoader, suffix: str, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    return {"__ref__": value} if suffix == "ref" else value


_TaggedLoader.add_multi_constructor("!", _plain)


def _resolve(value, top: dict, depth: int = 0):
    if depth > 20:
        raise ValueError("recipe: !ref chain too deep")
    if isinstance(value, dict) and set(value) == {"__ref__"}:
        match = _REF.match(str(value["__ref__"]).strip())
        if not match:
            raise ValueError(f"recipe: only plain '!ref <key>' references are supported here, got {value['__ref__']!r}")
        path = match.group(1).split(".")
        cur = top
        for part in path:
            cur = cur[part]
        return _resolve(cur, top, depth + 1)
    if isinstance(value, dict):
        return {k: _resolve(v, top, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, depth + 1) for v in value]
    return value


def _find_encoder_node(node: yaml.Node) -> yaml.MappingNode | None:
    if isinstance(node, yaml.MappingNode):
        if "Qwen2Encoder" in (node.tag or ""):
            return node
        for _, child in node.value:
            found = _find_encoder_node(child)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for child in node.value:
            found = _find_encoder_node(child)
            if found is not None:
                return found
    return None


def _from_hf_config(path: str) -> dict:
    url = path if path.endswith(".json") else storage.join(path, "config.json")
    if not storage.exists(url):
        raise FileNotFoundError(f"{url}: no Qwen2 config.json there (point --config at a CosyVoice-BlankEN folder, "
                                "its config.json or the recipe yaml)")
    return json.loads(storage.read_text(url))


def _from_recipe(url: str) -> dict:
    text = storage.read_text(url)
    root = yaml.compose(text, Loader=_TaggedLoader)
    encoder = _find_encoder_node(root)
    if encoder is None:
        raise ValueError(f"{url}: no !new:...Qwen2Encoder node in this recipe")
    loader = _TaggedLoader("")  # builds the nodes composed above (parsed once, tags kept as data)
    top = loader.construct_document(root)
    node_value = _resolve(loader.construct_mapping(encoder, deep=True), top)
    if node_value.get("config"):
        return dict(node_value["config"])
    pretrain = node_value.get("pretrain_path") or ""
    if pretrain:
        return _from_hf_config(pretrain)
    raise ValueError(f"{url}: the Qwen2Encoder node has neither `config:` nor a `pretrain_path` with config.json")


def qwen2_body_config(config, state_dict: dict | None = None) -> dict:
    """Qwen2Config fields of the LLM body. ``config``: a dict, a recipe ``.yaml``, an HF folder or
    ``config.json``; ``None`` = Qwen2-0.5B when the state dict has exactly its shapes. The result is
    checked against the state-dict shapes (an actionable error names the mismatch)."""
    if config is None:
        cfg = dict(QWEN2_0_5B)
        if state_dict is not None and _shape_problems(cfg, state_dict):
            raise ValueError("llm.pt is not Qwen2-0.5B shaped; pass --config (recipe yaml or CosyVoice-BlankEN dir): "
                             + "; ".join(_shape_problems(cfg, state_dict)))
    elif isinstance(config, dict):
        cfg = dict(config)
    elif str(config).endswith((".yaml", ".yml")):
        cfg = _from_recipe(str(config))
    else:
        cfg = _from_hf_config(str(config))
    if "rope_theta" not in cfg and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_theta"] = cfg["rope_parameters"].get("rope_theta")
    if state_dict is not None:
        problems = _shape_problems(cfg, state_dict)
        if problems:
            raise ValueError(f"config {config!r} does not match llm.pt: " + "; ".join(problems))
    return cfg


def _shape_problems(cfg: dict, sd: dict) -> list[str]:
    p = "llm.model.model."
    heads = cfg.get("num_attention_heads", 0)
    hidden = cfg.get("hidden_size", 0)
    head_dim = cfg.get("head_dim") or (hidden // heads if heads else 0)
    want = {
        f"{p}embed_tokens.weight": (cfg.get("vocab_size"), hidden),
        f"{p}layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
        f"{p}layers.0.self_attn.k_proj.weight": (cfg.get("num_key_value_heads", heads) * head_dim, hidden),
        f"{p}layers.0.mlp.gate_proj.weight": (cfg.get("intermediate_size"), hidden),
    }
    problems = [f"{k}: config says {list(shape)}, llm.pt has {list(sd[k].shape)}"
                for k, shape in want.items() if k in sd and tuple(sd[k].shape) != tuple(shape)]
    layers = len({k.split(".")[4] for k in sd if k.startswith(f"{p}layers.")})
    if layers != cfg.get("num_hidden_layers"):
        problems.append(f"num_hidden_layers: config says {cfg.get('num_hidden_layers')}, llm.pt has {layers}")
    return problems
