"""from_config: dicts, YAML text and files, whole training configs, route overrides."""

from __future__ import annotations

import torch

import soapdsl
from tests.conftest import batches, make_net, max_rel_err, train_step


def test_dict_yaml_text_and_path_agree(tmp_path):
    cfg = {"recipe": "adamw", "args": {"lr": 0.01, "beta1": 0.8}}
    text = "recipe: adamw\nargs: {lr: 0.01, beta1: 0.8}\n"
    path = tmp_path / "opt.yaml"
    path.write_text(text)
    opts = [soapdsl.from_config(make_net(), c) for c in (cfg, text, path, str(path))]
    for o in opts:
        assert o.param_groups[0]["lr"] == 0.01 and o.param_groups[0]["beta1"] == 0.8
    assert len({o.plan.fingerprint for o in opts}) == 1


def test_optimizer_key_of_a_training_config():
    text = "model: {width: 32}\ntrain: {steps: 10}\noptimizer:\n  recipe: adam\n  args: {lr: 0.002}\n"
    opt = soapdsl.from_config(make_net(), text)
    assert opt.plan.recipe.name == "adam" and opt.param_groups[0]["lr"] == 0.002


def test_route_override_sends_head_to_adamw_with_its_own_lr():
    text = (
        "recipe: adam\n"
        "args: {lr: 0.003}\n"
        "routes:\n"
        "  - match: ['head.*']\n"
        "    recipe: adamw\n"
        "    args: {lr: 0.0005, weight_decay: 0.1}\n"
    )
    model = make_net()
    opt = soapdsl.from_config(model, text)
    head = {id(model.head.weight), id(model.head.bias)}
    assert {id(p) for p in opt.param_groups[0]["params"]} == head
    assert opt.param_groups[0]["lr"] == 0.0005 and opt.param_groups[1]["lr"] == 0.003

    # equals torch with the same two groups
    ref_model = make_net()
    ref_head = [ref_model.head.weight, ref_model.head.bias]
    rest = [p for n, p in ref_model.named_parameters() if not n.startswith("head.")]
    ref_a = torch.optim.AdamW(ref_head, lr=0.0005, weight_decay=0.1)
    ref_b = torch.optim.Adam(rest, lr=0.003)

    class Both(torch.optim.Optimizer):
        def __init__(self):
            self.opts = (ref_a, ref_b)

        def zero_grad(self, set_to_none=True):
            for o in self.opts:
                o.zero_grad()

        def step(self, closure=None):
            for o in self.opts:
                o.step()

    both = Both()
    for batch in batches(30):
        train_step(model, opt, batch)
        train_step(ref_model, both, batch)
    assert max_rel_err(model, ref_model) < 1e-5


def test_override_where_selector_and_state_dict_identity():
    cfg = {"recipe": "adamw", "routes": [{"where": "vector", "recipe": "adam", "args": {"lr": 0.1}}]}
    a = soapdsl.from_config(make_net(), cfg)
    b = soapdsl.from_config(make_net(), {"recipe": "adamw"})
    assert a.param_groups[0]["route"] == "vector"
    assert a.plan.fingerprint != b.plan.fingerprint
