"""Every tiny registry variant, and vit_demo / r_vit_demo with each of the ViT paper's options."""
import pytest
import torch

from pretrain.models import MODELS, enable_attention_maps, export_spec

VIT_OPTIONS = {
    "pos_2d": dict(pos_embed="2d"),
    "pos_rel": dict(pos_embed="rel"),
    "pos_none": dict(pos_embed="none"),
    "gap": dict(class_token=False),
    "gpsa": dict(gpsa_blocks=2),
    "gpsa_gap": dict(gpsa_blocks=2, global_pool="avg", locality_strength=2.0),
    "pre_logits": dict(pre_logits_size=32),
}
TINY_CASES = (
    [(name, {}) for name, spec in MODELS.items() if spec.tiny]
    + [("vit_demo", options) for options in VIT_OPTIONS.values()]
    + [("r_vit_demo", dict(pos_embed="2d", pre_logits_size=32)), ("r_vit_demo", dict(class_token=False))]
)
TIMM_BACKED_CASES = [(n, o) for n, o in TINY_CASES if export_spec(n, **o)["timm_name"] is not None]
OWN_CASES = [(n, o) for n, o in TINY_CASES if export_spec(n, **o)["timm_name"] is None]


def _case_id(case):
    name, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in options.items())])


@pytest.fixture(params=TINY_CASES, ids=_case_id)
def tiny_case(request):
    return request.param


@pytest.fixture(params=TIMM_BACKED_CASES, ids=_case_id)
def timm_backed_case(request):
    return request.param


@pytest.fixture(params=OWN_CASES, ids=_case_id)
def own_case(request):
    return request.param


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine spinning workers cost 3-5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def attention_maps(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{attention module name: (B, heads, N, N)} from hooks on `*.attn_drop`, one eval forward."""
    enable_attention_maps(model)
    maps = {}
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, key=name.removesuffix(".attn_drop"): maps.__setitem__(key, out))
        for name, module in model.named_modules()
        if name.endswith("attn_drop")
    ]
    model.eval()(images)
    for hook in hooks:
        hook.remove()
    return maps


@pytest.fixture(scope="session")
def capture_attention():
    return attention_maps
