import torchvision

import hawada
import hawada.core as core

SEED_NAMES = [
    "KDConfig",
    "kd_loss",
    "mse_reg",
    "combined_penalty",
    "project_gates_into_constraints",
    "LatencyProxy",
    "measure_latency_ms",
    "ExportPolicy",
    "Rounding",
    "keep_group_indices_from_gate",
    "keep_element_indices_from_gate",
    "slice_linear",
    "slice_conv2d",
    "slice_embedding",
    "grid_search_latency",
    "LagrangeTrainer",
    "finetune_student",
]


def test_public_names():
    for name in ["attach", "gates", "export", "export_keepall", "GateConfig", "ExportPolicy", "Rounding"]:
        assert hasattr(hawada, name), name
    for name in SEED_NAMES:
        assert callable(getattr(core, name)), name


def test_defaults_work_and_attach_is_in_place():
    model = torchvision.models.resnet18(num_classes=3)
    same = hawada.attach(model, hawada.GateConfig())
    assert same is model
    store = hawada.gates(model)
    assert store.logits.dim() == 1 and store.logits.requires_grad
    assert {s.kind for s in store.segments} == {"block", "stage"}
    seg = store.segments[0]
    assert (seg.name, seg.kind, seg.start, seg.count, seg.group_size, seg.layer) == (
        "layer1",
        "stage",
        0,
        64,
        1,
        1,
    )
    assert hawada.ExportPolicy().rounding is None
