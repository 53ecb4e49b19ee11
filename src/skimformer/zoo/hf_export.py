"""Export `transformers` models in the conventions of DESIGN.md.

An encoder becomes `model.pt2`; a causal LM becomes `prefill.pt2` and `decode.pt2`, with the KV
cache as explicit per-layer tensors. Forward signatures are generated so that torch.export's
placeholders carry exactly the convention's names (`past_key_0`, not `past_past_key_0`). Every
program is checked against eager torch before anything is written, and the output folder appears
only when everything in it is complete.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
import transformers
from transformers.cache_utils import DynamicLayer

from skimformer.atomic import atomic_folder
from skimformer.errors import UserError, VerificationError
from skimformer.ir.rewrite import relax_sum_ranges

DYN = torch.export.Dim.DYNAMIC
TOLERANCE = 1e-4
# Copied beside the programs so that engines can tokenize and know their special tokens.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab*", "merges.txt",
              "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DECODER_INPUTS = ["input_ids", "attention_mask", "position_ids"]
# New tokens in the decode examples: a verification step's shape. One token would do for
# generation, but programs are re-exported on their examples (ir.rewrite), and a size of 1 there
# would be specialised; one-token steps are checked separately.
DECODE_TOKENS = 3

Progress = Callable[[str], None]


# -- loading ------------------------------------------------------------------------------------

def load_pretrained(model_dir: str | Path) -> torch.nn.Module:
    """A transformers model from a local folder, fp32, eval mode; random weights (seed 0) without a weights file.

    Nothing is fetched from a hub: the folder must hold `config.json`, and the class comes from
    `config.architectures[0]` so that task heads (`...ForSequenceClassification`) are kept.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = Path(model_dir)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; give a transformers model folder with config.json")
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: give a folder written by save_pretrained")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"{folder}/config.json cannot be read by transformers {transformers.__version__} "
                        f"({_first_line(e)}); check model_type or upgrade transformers") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{folder} holds an encoder-decoder model ({config.model_type}); only encoders and causal LMs "
                        "are exported")
    cls = _model_class(config)
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    torch.manual_seed(0)
    for impl in ("sdpa", None):  # sdpa keeps attention one fused op; some families only have eager
        kwargs = {"attn_implementation": impl} if impl else {}
        try:
            if has_weights:
                model = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **kwargs)
            else:
                model = (cls.from_config if hasattr(cls, "from_config") else cls._from_config)(config, **kwargs)
            return model.float().eval()
        except (ValueError, ImportError) as e:
            error = e
    raise UserError(f"transformers cannot build {cls.__name__} from {folder} ({_first_line(error)})")


def _model_class(config) -> type:
    """The class named by `architectures[0]`, else the Auto class the model type suggests."""
    names = list(getattr(config, "architectures", None) or [])
    if names and isinstance(getattr(transformers, names[0], None), type):
        return getattr(transformers, names[0])
    from transformers.models.auto import modeling_auto as auto

    # Encoders (BERT and kin) also have a causal-LM class; a masked-LM class marks them as encoders.
    causal = config.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        getattr(config, "is_decoder", False) or config.model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return transformers.AutoModelForCausalLM if causal else transformers.AutoModel


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether `model` generates text: a `...ForCausalLM` / `...LMHeadModel` class or one transformers registers as such."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    return name.endswith(CAUSAL_SUFFIXES) or name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- exporting and checking ---------------------------------------------------------------------

def _named_forward(names: list[str]):
    """A forward whose parameters are `names`, passing them on as a list to `self.step`.

    torch.export names placeholders after the forward's parameters; a `*args` or dict parameter
    would give `args_0` or `past_past_key_0` instead of the convention's names.
    """
    src = f"def forward(self, {', '.join(names)}):\n    return self.step([{', '.join(names)}])\n"
    scope: dict = {}
    exec(src, scope)  # noqa: S102 - generated from our own identifiers, never from user text
    return scope["forward"]


def _wrapper(names: list[str], step: Callable, model: torch.nn.Module) -> torch.nn.Module:
    cls = type("Exported", (torch.nn.Module,), {"forward": _named_forward(names), "step": step})
    module = cls()
    module.model = model
    module.names = names
    return module


def _export(module: torch.nn.Module, args: tuple, dynamic: tuple | None) -> torch.export.ExportedProgram:
    try:
        ep = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    except UserError:
        raise
    except Exception as e:  # torch.export raises many kinds; the user needs the first line and a way out
        name = type(getattr(module, "model", module)).__name__
        raise UserError(f"torch.export could not export {name} ({_first_line(e)}); try --static") from None
    relax_sum_ranges(ep)
    return ep


def export_verified(label: str, module: torch.nn.Module, examples: tuple, dynamic: tuple | None = None,
                    trace: tuple | None = None, checks: tuple = ()) -> torch.export.ExportedProgram:
    """`module` exported (traced on `trace`, else on `examples`), checked against eager torch on
    the examples, the traced inputs and `checks`, and keeping `examples` as its example inputs."""
    ep = _export(module, trace or examples, dynamic)
    _verify(label, module, ep, examples, *([trace] if trace else []), *checks)
    return _with_examples(ep, examples)


def _verify(label: str, module: torch.nn.Module, ep: torch.export.ExportedProgram, *cases: tuple) -> None:
    """The exported program matches eager `module` on every input tuple in `cases`."""
    run = ep.module()
    with torch.no_grad():
        for args in cases:
            _compare(label, module(*args), run(*args))


def _compare(label: str, want: dict, got: dict) -> None:
    if list(got) != list(want):
        raise VerificationError(f"the exported {label} program returns {list(got)}, eager returns {list(want)}")
    for key, ref in want.items():
        err = (got[key] - ref).abs().max().item() if got[key].shape == ref.shape else float("inf")
        if not err <= TOLERANCE * max(1.0, ref.abs().max().item()):
            raise VerificationError(f"the exported {label} program differs from eager torch on {key} "
                                    f"(shape {tuple(got[key].shape)} vs {tuple(ref.shape)}, max abs error {err:.3g})")


def _with_examples(ep: torch.export.ExportedProgram, args: tuple) -> torch.export.ExportedProgram:
    """Keep the user-facing example inputs (the traced ones may differ in batch or token count)."""
    ep.example_inputs = (tuple(args), {})
    return ep


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- encoders -----------------------------------------------------------------------------------

def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)[-2:]


def _encoder_inputs(model: torch.nn.Module, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Realistic inputs: images, or token ids with the second row's last quarter padded."""
    config = model.config
    if model.main_input_name == "pixel_values":
        shape = (batch, getattr(config, "num_channels", 3), *_image_size(config))
        return {"pixel_values": torch.randn(shape, generator=_seeded(0))}
    ids = torch.randint(3, config.vocab_size, (batch, seq_len), generator=_seeded(0))
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    if batch > 1:
        mask[1, seq_len - max(1, seq_len // 4):] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in inspect.signature(model.forward).parameters and getattr(config, "type_vocab_size", 0):
        feeds["token_type_ids"] = torch.zeros(batch, seq_len, dtype=torch.long)
    return feeds


def _encoder_step(self, args):
    """Every tensor the model returns, in its own order (`last_hidden_state` or the head's output first)."""
    out = self.model(**dict(zip(self.names, args)))
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def export_encoder(model: torch.nn.Module, out: Path, batch: int, seq_len: int, static: bool) -> list[Path]:
    """`out/model.pt2`, batch and sequence dynamic unless `static`."""
    if model.main_input_name not in ("input_ids", "pixel_values"):
        raise UserError(f"{type(model).__name__} reads {model.main_input_name}; only text (input_ids) and vision "
                        "(pixel_values) encoders are exported")
    feeds = _encoder_inputs(model, batch, seq_len)
    names = list(feeds)
    module = _wrapper(names, _encoder_step, model)
    if static:
        ep = export_verified("encoder", module, tuple(feeds.values()))
    else:
        # Traced with two rows so that the batch is not specialised; checked at another shape too.
        trace = tuple(_encoder_inputs(model, max(batch, 2), seq_len).values())
        other = tuple(_encoder_inputs(model, batch + 1, seq_len - 1 if seq_len > 2 else 3).values())
        dims = tuple({0: DYN} if n == "pixel_values" else {0: DYN, 1: DYN} for n in names)
        ep = export_verified("encoder", module, tuple(feeds.values()), dims, trace=trace, checks=(other,))
    torch.export.save(ep, out / "model.pt2")
    return [out / "model.pt2"]


# -- causal LMs ---------------------------------------------------------------------------------

def additive_causal_mask(attention_mask: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    """`[B, 1, n, past+n]` additive mask: causal over the cache, padding removed.

    Built here rather than by transformers, whose mask code branches on the query length (one
    token or several) and on whether the mask has padding, which would bake one case into the
    program. Each query may always see its own position, so a padded query attends to something
    and stays finite (its output is never read), instead of an undefined all-masked row on which
    engines legitimately disagree.
    """
    total = attention_mask.shape[1]
    query_pos = torch.arange(n, device=attention_mask.device)[:, None] + (total - n)
    key_pos = torch.arange(total, device=attention_mask.device)[None, :]
    allowed = (key_pos <= query_pos)[None, None] & attention_mask[:, None, None, :].bool()
    allowed = allowed | (key_pos == query_pos)[None, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _decoder_step(self, args):
    """One call of the causal LM on explicit tensors: a cache rebuilt from `past_*`, `present_*` read back."""
    ids, mask, positions, past = args[0], args[1], args[2], args[3:]
    cache = transformers.DynamicCache(config=self.model.config)
    for i in range(0, len(past), 2):
        cache.update(past[i], past[i + 1], i // 2)
    out = self.model(input_ids=ids, attention_mask=additive_causal_mask(mask, ids.shape[1], self.model.dtype),
                     position_ids=positions, past_key_values=cache, use_cache=True)
    return {"logits": out.logits, **_present(self.model, out.past_key_values)}


def _present(model: torch.nn.Module, cache) -> dict[str, torch.Tensor]:
    """`present_key_{i}`, `present_value_{i}` in layer order, from a cache of plain full-attention layers."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        raise UserError(f"{type(model).__name__} keeps a {', '.join(kinds)} cache (sliding-window, linear or "
                        "indexed attention); only causal LMs with a full key/value cache per layer are exported")
    present = {}
    for i, layer in enumerate(layers):
        present[f"present_key_{i}"], present[f"present_value_{i}"] = layer.keys, layer.values
    return present


def _layers(model: torch.nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers


def _prompt(vocab: int, batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill inputs: ids, a mask with row 1 left-padded (batched generation) and positions skipping the padding."""
    ids = torch.randint(3, vocab, (batch, n), generator=_seeded(0))
    mask = torch.ones(batch, n, dtype=torch.long)
    if batch > 1:
        mask[1, :max(1, n // 4)] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _continuation(prefill: torch.nn.Module, prompt: tuple, new: int) -> tuple[tuple, tuple]:
    """Decode inputs that continue `prompt` by `new` tokens with the prefill's real cache, and the whole sequence."""
    ids, mask, pos = prompt
    with torch.no_grad():
        cache = prefill(*prompt)
    batch = ids.shape[0]
    new_ids = torch.randint(3, prefill.model.config.get_text_config().vocab_size, (batch, new), generator=_seeded(1))
    full_mask = torch.cat([mask, torch.ones(batch, new, dtype=torch.long)], dim=1)
    new_pos = pos[:, -1:] + 1 + torch.arange(new)
    past = [t for k, t in cache.items() if k.startswith("present_")]
    return (new_ids, full_mask, new_pos, *past), (torch.cat([ids, new_ids], 1), full_mask, torch.cat([pos, new_pos], 1))


def _verify_continuation(model: torch.nn.Module, ep: torch.export.ExportedProgram, step: tuple, whole: tuple) -> None:
    """Decoding from the prefill's cache gives transformers' own logits for the whole sequence.

    The reference uses transformers' mask handling, not ours, so this also checks the mask.
    """
    n = step[0].shape[1]
    with torch.no_grad():
        want = model(input_ids=whole[0], attention_mask=whole[1], position_ids=whole[2]).logits[:, -n:]
        got = ep.module()(*step)["logits"]
    _compare("decode", {"logits": want}, {"logits": got})


def _export_decode(decode: torch.nn.Module, step: tuple, trace: tuple | None, checks: tuple, layers: int,
                   static: bool) -> torch.export.ExportedProgram:
    """The decode program; when dynamic, every `past_*` shares one `past` size if torch.export can
    prove it, else each gets its own symbol."""
    if static:
        return export_verified("decode", decode, step)
    tokens = ({0: DYN, 1: DYN},) * len(DECODER_INPUTS)
    for past in (torch.export.Dim("past"), DYN):
        try:
            return export_verified("decode", decode, step, tokens + ({0: DYN, 2: past},) * (2 * layers),
                                   trace=trace, checks=checks)
        except UserError as e:
            error = e
    raise error


def export_decoder(model: torch.nn.Module, out: Path, batch: int, seq_len: int, static: bool,
                   progress: Progress) -> list[Path]:
    """`out/prefill.pt2` and `out/decode.pt2` in the decoder convention (batch, n and past dynamic unless `static`).

    The examples are a prompt with row 1 left-padded and its continuation by `DECODE_TOKENS`
    tokens (one when static) from the prefill's real cache. Dynamic programs are traced with at
    least two rows, so that no size is specialised to 1, and are also checked on one-token steps
    and a one-token prompt, the shapes of generation.
    """
    layers, vocab = _layers(model), model.config.get_text_config().vocab_size
    past_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    prefill = _wrapper(DECODER_INPUTS, _decoder_step, model)
    decode = _wrapper(DECODER_INPUTS + past_names, _decoder_step, model)
    prompt = _prompt(vocab, batch, seq_len)
    step, whole = _continuation(prefill, prompt, 1 if static else DECODE_TOKENS)
    dims = trace_prompt = trace_step = None
    prefill_checks = decode_checks = ()
    if not static:
        dims = ({0: DYN, 1: DYN},) * len(DECODER_INPUTS)
        if batch < 2:
            trace_prompt = _prompt(vocab, 2, seq_len)
            trace_step = _continuation(prefill, trace_prompt, DECODE_TOKENS)[0]
        one_token = _prompt(vocab, 1, 1)
        prefill_checks = (one_token,)
        decode_checks = (_continuation(prefill, prompt, 1)[0], _continuation(prefill, one_token, 1)[0])
    progress("exporting prefill")
    ep_prefill = export_verified("prefill", prefill, prompt, dims, trace=trace_prompt, checks=prefill_checks)
    progress("exporting decode")
    ep_decode = _export_decode(decode, step, trace_step, decode_checks, layers, static)
    _verify_continuation(model, ep_decode, step, whole)
    torch.export.save(ep_prefill, out / "prefill.pt2")
    torch.export.save(ep_decode, out / "decode.pt2")
    return [out / "prefill.pt2", out / "decode.pt2"]


# -- output folders and entry points ------------------------------------------------------------

def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: give a folder for -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} already exists and is not empty: choose another -o folder or pass --force")


@contextlib.contextmanager
def output_folder(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """A temporary folder beside `out_dir`, moved into its place only if the block completes.

    An interrupted or failed export leaves no half-written output; an existing non-empty folder
    is replaced only with `force`.
    """
    out = Path(out_dir)
    _refuse_existing(out, force)
    with atomic_folder(out) as tmp:
        yield tmp


def _write_config(model: torch.nn.Module, folder: Path) -> None:
    """`config.json`, naming the exported class so that later tools (and `export` itself) know the family."""
    config = {**model.config.to_diff_dict(), "architectures": [type(model).__name__]}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_side_files(source: Path, dest: Path) -> None:
    for pattern in SIDE_FILES:
        for path in source.glob(pattern):
            if path.is_file():
                shutil.copy2(path, dest / path.name)


def export_model(model: torch.nn.Module, out_dir: str | Path, *, batch: int = 2, seq_len: int = 16,
                 static: bool = False, force: bool = False, tokenizer_dir: str | Path | None = None,
                 progress: Progress | None = None) -> list[Path]:
    """Export an in-memory transformers model into `out_dir`; returns the program files written.

    A causal LM gives `prefill.pt2` + `decode.pt2`, anything else `model.pt2`; `config.json` is
    written beside them and the tokenizer files of `tokenizer_dir` are copied. The model is put
    in fp32 and eval mode in place: the programs are references for fp32 parity checks.
    """
    progress = progress or (lambda message: None)
    vision = getattr(model, "main_input_name", "input_ids") == "pixel_values"
    if batch < 1 or (seq_len < 2 and not vision):
        raise UserError(f"batch must be >= 1 and seq_len >= 2 (got batch {batch}, seq_len {seq_len})")
    model = model.float().eval()
    decoder = is_causal_lm(model)
    progress(f"exporting {type(model).__name__} as {'prefill + decode programs' if decoder else 'an encoder'}")
    with output_folder(out_dir, force) as tmp:
        if decoder:
            files = export_decoder(model, tmp, batch, seq_len, static, progress)
        else:
            files = export_encoder(model, tmp, batch, seq_len, static)
        _write_config(model, tmp)
        if tokenizer_dir is not None:
            _copy_side_files(Path(tokenizer_dir), tmp)
    progress(f"wrote {', '.join(f.name for f in files)} to {out_dir}")
    return [Path(out_dir) / f.name for f in files]


def export_pretrained(model_dir: str | Path, out_dir: str | Path, *, batch: int = 2, seq_len: int = 16,
                      static: bool = False, force: bool = False, progress: Progress | None = None) -> list[Path]:
    """`skimformer export`: a transformers folder (config.json, weights optional) to .pt2 programs."""
    _refuse_existing(Path(out_dir), force)  # before the model loads, so the refusal is immediate
    if progress:
        progress(f"loading {model_dir}")
    model = load_pretrained(model_dir)
    return export_model(model, out_dir, batch=batch, seq_len=seq_len, static=static, force=force,
                        tokenizer_dir=model_dir, progress=progress)
