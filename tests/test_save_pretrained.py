"""A slim model's own ``save_pretrained`` writes a whole folder (docs/DESIGN.md, "Saved models").

For BERT, ViT (bare and classifier), LLaMA and Qwen2 with GQA (6 query heads over 2 KV heads):
a non-uniform export saved with ``save_pretrained`` alone loads with ``AutoModel*`` and
``trust_remote_code=True`` and with ``hawada.load_slim``, and both equal the in-memory slim model
exactly (fp32, eval mode; decoders also generate the same tokens); a uniform export stays a stock
folder that a plain ``from_pretrained`` loads; ``save_slim`` writes the same folder plus
``layout.json``; and the folder loads in a fresh process, offline, with an empty module cache and
without HawAda importable.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

import hawada
from hawada.adapters.base import adapter_for, get_adapter
from hawada.adapters.hf_decoder import HFDecoderAdapter, layer_widths
from hawada.core.export import ExportPolicy
from hawada.errors import InputError, PathNotFoundError
from hawada.hf_remote.folder import declares_layout
from tests import test_hf_decoder as dec
from tests import test_hf_encoder as enc

GEN = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)


def read_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------- encoders
def encoder_slim(name: str):
    """A non-uniform export: layer 0 keeps no head, layer 1 no FFN neuron, layer 2 some of each."""
    g = enc.gated(name)
    enc.randomize(hawada.gates(g))
    slim = hawada.export(g)
    lay = adapter_for(slim).layout(slim)["layers"]
    assert len({(la["attn"], la["ffn"]) for la in lay}) == len(lay)  # every layer differs
    return slim, lay


@pytest.mark.parametrize(
    "name, task_auto",
    [
        ("BertModel", AutoModel),
        ("ViTModel", AutoModel),
        ("ViTForImageClassification", AutoModelForImageClassification),
    ],
)
def test_encoder_save_pretrained_loads_both_ways(tmp_path, name: str, task_auto) -> None:
    slim, lay = encoder_slim(name)
    x = adapter_for(slim).example_inputs(slim)
    ref = enc.out(slim, x)
    folder = tmp_path / "slim"
    slim.save_pretrained(str(folder))  # the model's own method, nothing else
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "modeling_hawada.py"]
    cfg = read_config(folder)
    assert cfg["architectures"] == [name]
    assert cfg["hawada_layout"]["layers"] == lay
    assert (
        cfg["auto_map"]["AutoModel"] == cfg["auto_map"][task_auto.__name__] == f"modeling_hawada.Hawada{name}"
    )
    assert cfg["auto_map"]["AutoConfig"].startswith("modeling_hawada.Hawada")
    for auto in {AutoModel, task_auto}:
        b = auto.from_pretrained(str(folder), trust_remote_code=True).eval()
        assert type(b).__name__ == "Hawada" + name
        assert torch.equal(enc.out(b, x), ref)
    a = hawada.load_slim(str(folder))  # stock classes, no remote code
    assert type(a) is type(slim)
    assert torch.equal(enc.out(a, x), ref)
    # as a run's model.path too (the family's loader, e.g. a slim teacher)
    assert declares_layout(str(folder))
    t = get_adapter("hf_encoder").load_model("unused", 0, str(folder))
    assert type(t) is type(slim) and torch.equal(enc.out(t, x), ref)
    # the stock class alone cannot build it: the widths are in the layout, not in the stock fields
    with pytest.raises((RuntimeError, ValueError)):
        AutoModel.from_pretrained(str(folder), trust_remote_code=False)


def test_a_loaded_slim_encoder_saves_a_whole_folder_again(tmp_path) -> None:
    slim, _ = encoder_slim("ViTForImageClassification")
    x = adapter_for(slim).example_inputs(slim)
    ref = enc.out(slim, x)
    slim.save_pretrained(str(tmp_path / "a"))
    # once through HawAda's loader, once through transformers' remote code: both re-save whole
    hawada.load_slim(str(tmp_path / "a")).save_pretrained(str(tmp_path / "b"))
    remote = AutoModelForImageClassification.from_pretrained(str(tmp_path / "a"), trust_remote_code=True)
    remote.save_pretrained(str(tmp_path / "c"))
    for sub in ("b", "c"):
        assert read_config(tmp_path / sub)["hawada_layout"] == read_config(tmp_path / "a")["hawada_layout"]
        b = AutoModelForImageClassification.from_pretrained(str(tmp_path / sub), trust_remote_code=True)
        assert torch.equal(enc.out(b.eval(), x), ref)
        assert torch.equal(enc.out(hawada.load_slim(str(tmp_path / sub)), x), ref)


def test_auto_model_gives_the_class_each_folder_holds(tmp_path) -> None:
    """Folders of one name hold the same modeling file, which transformers imports once; AutoModel
    still gives each folder's own class, whichever was loaded first."""
    refs = {}
    for name in ("ViTModel", "ViTForImageClassification"):
        slim, _ = encoder_slim(name)
        x = adapter_for(slim).example_inputs(slim)
        refs[name] = (x, enc.out(slim, x))
        slim.save_pretrained(str(tmp_path / name / "slim"))
    for name in ("ViTForImageClassification", "ViTModel", "ViTForImageClassification"):
        b = AutoModel.from_pretrained(str(tmp_path / name / "slim"), trust_remote_code=True).eval()
        assert type(b).__name__ == "Hawada" + name
        x, ref = refs[name]
        assert torch.equal(enc.out(b, x), ref)


@pytest.mark.parametrize("name", ["BertModel", "ViTModel"])
def test_uniform_encoder_saves_a_stock_folder(tmp_path, name: str) -> None:
    g = enc.gated(name)
    enc.randomize(hawada.gates(g))
    ad = adapter_for(g)
    slim = hawada.export(g, ad.uniform_policy(g, ExportPolicy()))
    assert type(slim.config).__module__.startswith("transformers.")  # a stock config class
    x = ad.example_inputs(slim)
    slim.save_pretrained(str(tmp_path))
    cfg = read_config(tmp_path)
    assert "auto_map" not in cfg and "hawada_layout" not in cfg
    assert not (tmp_path / "modeling_hawada.py").exists() and not declares_layout(str(tmp_path))
    assert cfg["intermediate_size"] < enc.FFN
    plain = AutoModel.from_pretrained(str(tmp_path)).eval()  # no remote code
    assert type(plain) is type(slim)
    assert torch.equal(enc.out(plain, x), enc.out(slim, x))
    back = hawada.load_slim(str(tmp_path))  # a stock folder of a supported class loads too
    assert type(back) is type(slim) and torch.equal(enc.out(back, x), enc.out(slim, x))


def test_save_slim_is_save_pretrained_plus_a_description(tmp_path) -> None:
    slim, _ = encoder_slim("BertModel")
    hawada.save_slim(slim, str(tmp_path / "s"))
    slim.save_pretrained(str(tmp_path / "p"))
    assert sorted(os.listdir(tmp_path / "s")) == sorted(os.listdir(tmp_path / "p") + ["layout.json"])
    assert read_config(tmp_path / "s") == read_config(tmp_path / "p")
    for f in ("model.safetensors", "modeling_hawada.py"):
        assert filecmp.cmp(tmp_path / "s" / f, tmp_path / "p" / f, shallow=False)
    with open(tmp_path / "s" / "layout.json") as f:
        assert json.load(f)["family"] == "hf_encoder"


# ---------------------------------------------------------------------- decoders
def set_open(store, name: str, open_units: list[int]) -> None:
    """Gate logits of segment ``name``: units in ``open_units`` open (+2), the others closed (-2)."""
    s = store.segment(name)
    with torch.no_grad():
        store.logits[s.start : s.stop] = -2.0
        for u in open_units:
            store.logits[s.start + u] = 2.0


def decoder_slim(family: str, tied: bool):
    """A non-uniform GQA export: layer 0 keeps query slots 0 and 2 of both KV groups (4 query
    heads over 2 KV heads), layer 1 keeps all 3 slots of KV group 1 only (3 over 1); the FFNs
    keep different groups."""
    base = dec.tiny_model(family, "sdpa", tied=tied, seed=7)
    assert base.config.num_attention_heads == 6 and base.config.num_key_value_heads == 2
    g = dec.gated(base)
    store = hawada.gates(g)
    set_open(store, "layer0.heads", [0, 2])
    set_open(store, "layer0.kv", [0, 1])
    set_open(store, "layer1.heads", [0, 1, 2])
    set_open(store, "layer1.kv", [1])
    set_open(store, "layer0.ffn", [0, 3, 5])
    set_open(store, "layer1.ffn", [1, 2, 4, 6])  # the last group is partial (100 = 6 * 16 + 4)
    g.eval()
    slim = hawada.export(g)
    assert layer_widths(slim) == [
        {"heads": 4, "kv_heads": 2, "intermediate": 48},
        {"heads": 3, "kv_heads": 1, "intermediate": 52},
    ]
    return slim


def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("family, tied", [("llama", True), ("qwen2", False)])
def test_decoder_save_pretrained_loads_both_ways(tmp_path, family: str, tied: bool) -> None:
    slim = decoder_slim(family, tied)
    ad = HFDecoderAdapter()
    x = ad.example_inputs(slim)
    ids = prompt()
    with torch.no_grad():
        ref, ref_gen = ad.check_output(slim, x), slim.generate(ids, **GEN)
    folder = tmp_path / "slim"
    slim.save_pretrained(str(folder))
    assert {"config.json", "model.safetensors", "modeling_hawada.py"} <= set(os.listdir(folder))
    assert "layout.json" not in os.listdir(folder)
    cfg = read_config(folder)
    cls = type(slim).__name__
    assert cfg["hawada_layout"] == layer_widths(slim)
    assert (
        cfg["auto_map"]["AutoModelForCausalLM"]
        == cfg["auto_map"]["AutoModel"]
        == f"modeling_hawada.Hawada{cls}"
    )
    loaded = {
        "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True),
        "AutoModel": AutoModel.from_pretrained(str(folder), trust_remote_code=True),
        "load_slim": hawada.load_slim(str(folder)),
        "model.path": HFDecoderAdapter().load_model(family, 0, str(folder)),
    }
    assert type(loaded["load_slim"]) is type(loaded["model.path"]) is type(slim)
    for how, m in loaded.items():
        m.eval()
        assert type(m).__name__ in (cls, "Hawada" + cls), how
        assert layer_widths(m) == layer_widths(slim), how
        with torch.no_grad():
            assert torch.equal(ad.check_output(m, x), ref), how
            assert torch.equal(m.generate(ids, **GEN), ref_gen), how
        if tied:
            assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), how


def test_uniform_decoder_saves_a_stock_folder(tmp_path) -> None:
    base = dec.tiny_model("qwen2", "sdpa", seed=7)
    g = dec.gated(base)
    store = hawada.gates(g)
    for i in range(2):
        set_open(store, f"layer{i}.heads", [0, 1])
        set_open(store, f"layer{i}.kv", [0, 1])
        set_open(store, f"layer{i}.ffn", [i, 2, 3])
    slim = hawada.export(g)
    widths = layer_widths(slim)
    assert widths == [{"heads": 4, "kv_heads": 2, "intermediate": 48}] * 2
    ad = HFDecoderAdapter()
    x, ids = ad.example_inputs(slim), prompt()
    slim.save_pretrained(str(tmp_path))
    cfg = read_config(tmp_path)
    assert "auto_map" not in cfg and "hawada_layout" not in cfg
    assert not (tmp_path / "modeling_hawada.py").exists()
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]) == (4, 2, 48)
    for m in (AutoModelForCausalLM.from_pretrained(str(tmp_path)), hawada.load_slim(str(tmp_path))):
        m.eval()
        assert type(m) is type(slim)
        with torch.no_grad():
            assert torch.equal(ad.check_output(m, x), ad.check_output(slim, x))
            assert torch.equal(m.generate(ids, **GEN), slim.generate(ids, **GEN))


# ---------------------------------------------------------------------- a fresh process, offline
FRESH = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    enc, dec, out = sys.argv[1:4]
    x = load_file(enc + "/probe.safetensors")
    m = AutoModelForImageClassification.from_pretrained(enc, trust_remote_code=True).eval()
    y = {}
    with torch.no_grad():
        y["vit"] = m(pixel_values=x["pixel_values"]).logits
        d = AutoModelForCausalLM.from_pretrained(dec, trust_remote_code=True).eval()
        p = load_file(dec + "/probe.safetensors")
        y["llama"] = d(input_ids=p["input_ids"], attention_mask=p["attention_mask"], use_cache=False).logits
        y["gen"] = d.generate(p["prompt"], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    save_file(y, out)
    print(json.dumps({"hawada_imported": any(k.split(".")[0] == "hawada" for k in sys.modules)}))
    """
)


def test_saved_folders_load_offline_in_a_fresh_process_without_hawada(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    vit, _ = encoder_slim("ViTForImageClassification")
    llama = decoder_slim("llama", tied=True)
    xv = adapter_for(vit).example_inputs(vit)
    xd = HFDecoderAdapter().example_inputs(llama)
    ids = prompt()
    with torch.no_grad():
        ref = {
            "vit": enc.out(vit, xv),
            "llama": HFDecoderAdapter().check_output(llama, xd),
            "gen": llama.generate(ids, **GEN),
        }
    work = tmp_path / "saved"
    vit.save_pretrained(str(work / "vit"))
    llama.save_pretrained(str(work / "llama"))
    save_file({"pixel_values": xv["pixel_values"]}, str(work / "vit" / "probe.safetensors"))
    save_file({**xd, "prompt": ids}, str(work / "llama" / "probe.safetensors"))
    moved = tmp_path / "elsewhere"  # the folders stand alone: moved, and read where they lie
    shutil.move(str(work), str(moved))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH,
            str(moved / "vit"),
            str(moved / "llama"),
            str(tmp_path / "y.safetensors"),
        ],
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"hawada_imported": False}
    assert (tmp_path / "hf_home" / "modules").is_dir()  # the remote code was really imported there
    got = load_file(str(tmp_path / "y.safetensors"))
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


# ---------------------------------------------------------------------- bad folders
def test_load_slim_names_what_a_folder_lacks(tmp_path) -> None:
    with pytest.raises(PathNotFoundError, match="neither layout.json nor config.json"):
        hawada.load_slim(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SwinModel"], "model_type": "swin"}))
    with pytest.raises(InputError, match="declares SwinModel, a class no HawAda family saves and loads") as e:
        hawada.load_slim(str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(PathNotFoundError, match="model folder not found"):
        hawada.load_slim(str(tmp_path / "missing"))
