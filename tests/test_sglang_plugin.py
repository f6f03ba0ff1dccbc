"""The SGLang plugin against the real SGLang 0.5.23 (CPU install: launch/install_sglang_cpu.sh).

Registration through the entry point, the spec class SGLang dispatches on, server-argument resolution with tiny
local models, a spawned child, and the target-side hooks as SGLang applies them. SGLang cannot run a model on CPU,
so the worker's forward path is not exercised here (see the README, "Serving with SGLang").
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("sglang.srt.plugins",
                    reason="SGLang is not installed; run launch/install_sglang_cpu.sh (CI does) to run these tests")

from whiflash_sgl.sglang import torchvision_stub  # noqa: E402

torchvision_stub.install()
sys.path.insert(0, str(Path(__file__).parent / "stubs"))  # sglang_probe, imported by spawned children too

import sglang.srt.model_executor.model_runner as model_runner  # noqa: E402  imported before the hooks apply
from sglang.srt.arg_groups.overrides import resolved_view  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402
from sglang.srt.server_args import prepare_server_args  # noqa: E402
from sglang.srt.speculative import spec_registry  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402

from whiflash_sgl import sglang_plugin  # noqa: E402
from whiflash_sgl.drafters.checkpoint import dflash_config, eagle3_config  # noqa: E402
from whiflash_sgl.errors import WhiFlashError  # noqa: E402
from whiflash_sgl.sglang import compat, hooks  # noqa: E402
from whiflash_sgl.sglang.layout import AuxLayout  # noqa: E402
from whiflash_sgl.sglang.settings import CONFIG_ENV, POLICY_ENV, RESOLVED_ENV, resolved_settings  # noqa: E402
from whiflash_sgl.sglang.spec import WhiflashSpecAlgo  # noqa: E402

load_plugins()
BLOCK = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer, make_model):
    """A 4-layer tiny target and the config folders of an EAGLE-3 and a DFlash drafter made for it."""
    from whiflash_sgl.target import Target

    root = tmp_path_factory.mktemp("sglang-models")
    target = Target(make_model(len(tiny_tokenizer), num_hidden_layers=4), tiny_tokenizer, name="tiny4")
    target.model.save_pretrained(root / "target")
    tiny_tokenizer.save_pretrained(root / "target")
    eagle3_config(target, draft_vocab_size=len(tiny_tokenizer), aux_layer_ids=[0, 1, 2]).save_pretrained(root / "eagle3")
    dflash_config(target, num_layers=1, block_size=BLOCK, target_layer_ids=[1, 2],
                  mask_token_id=0).save_pretrained(root / "dflash")
    return root


@pytest.fixture
def whiflash_env(monkeypatch, models):
    """WHIFLASH_CONFIG naming the DFlash drafter; the resolved settings do not leak out of the test."""
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"dflash_path": str(models / "dflash"), "policy": "heuristic"}))
    monkeypatch.delenv(POLICY_ENV, raising=False)
    monkeypatch.setenv(RESOLVED_ENV, "")
    monkeypatch.delenv(RESOLVED_ENV)
    return monkeypatch


def resolve(argv):
    """What `python -m sglang.launch_server` does with its arguments before it starts any process."""
    server_args = prepare_server_args(argv)
    server_args.resolve_once()
    return server_args


def serve_args(models, *extra):
    return ["--model-path", str(models / "target"), "--speculative-algorithm", "WHIFLASH",
            "--speculative-draft-model-path", str(models / "eagle3"), "--device", "cpu", *extra]


def test_entry_point_is_declared():
    found = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert found.get("whiflash") == "whiflash_sgl.sglang_plugin:register"


def test_installed_sglang_has_everything_the_plugin_uses():
    assert compat.problems() == []


def test_compat_finds_fields_and_imported_names_and_reports_missing_ones():
    spec = "sglang.srt.speculative"
    assert compat.problems({f"{spec}.eagle_worker_common:eagle_sample": (),  # imported there from eagle_utils
                            "sglang.srt.sampling.sampling_params:SamplingParams.sampling_seed": (),  # a struct field
                            "sglang.srt.sampling.sampling_params:TOP_K_ALL": ()}) == []  # a module constant
    assert compat.problems({f"{spec}.eagle_worker_common:no_such_name": (),
                            "sglang.srt.sampling.sampling_params:SamplingParams.no_such_field": (),
                            f"{spec}.eagle_utils:eagle_sample": ("no_such_parameter",)}) == [
        f"{spec}.eagle_worker_common.no_such_name: not defined",
        "sglang.srt.sampling.sampling_params.SamplingParams.no_such_field: not defined",
        f"{spec}.eagle_utils.eagle_sample: no parameter(s) no_such_parameter"]


def test_from_string_returns_the_spec_with_the_eagle3_face():
    algo = SpeculativeAlgorithm.from_string("whiflash")
    assert isinstance(algo, WhiflashSpecAlgo) and algo is SpeculativeAlgorithm.from_string("WHIFLASH")
    predicates = {name: getattr(algo, name)() for name in vars(SpeculativeAlgorithm)
                  if name.startswith(("is_", "supports_"))}
    true = {name for name, value in predicates.items() if value}
    assert true == {"is_some", "is_speculative", "is_eagle", "is_eagle3"}
    # the three methods the scheduler calls for every algorithm, which SGLang's plugin base class lacks
    assert algo.need_topk() is True
    assert algo.carries_draft_hidden_states() is False
    assert "create_future_map" in vars(WhiflashSpecAlgo)
    spec_registry._assert_custom_spec_algo_conforms(WhiflashSpecAlgo)


def test_register_again_changes_nothing():
    hooks_before = {target: len(entries) for target, entries in HookRegistry._hooks.items()}
    sglang_plugin.register()
    sglang_plugin.register()
    assert {target: len(entries) for target, entries in HookRegistry._hooks.items()} == hooks_before
    assert isinstance(SpeculativeAlgorithm.from_string("WHIFLASH"), WhiflashSpecAlgo)


def test_a_mismatched_sglang_registers_nothing_and_logs_why(monkeypatch, caplog):
    monkeypatch.setattr(spec_registry, "_REGISTRY", {})
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.setattr(sglang_plugin, "_hooks_registered", False)
    monkeypatch.setattr(compat, "problems", lambda: ["sglang.srt.speculative.eagle_info.EagleVerifyInput: not defined"])
    sglang_plugin.register()  # must not raise
    with pytest.raises(ValueError, match="Unknown speculative algorithm"):
        SpeculativeAlgorithm.from_string("WHIFLASH")
    assert not HookRegistry._hooks
    assert "needs sglang==0.5.23" in caplog.text and "EagleVerifyInput: not defined" in caplog.text


def test_register_never_raises(monkeypatch, caplog):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(compat, "problems", broken)
    sglang_plugin.register()
    assert "WHIFLASH not registered" in caplog.text and "boom" in caplog.text


def test_hooks_whose_module_cannot_import_are_skipped_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.setattr(hooks, "HOOKS", (("sglang.srt.no_such_module", "f", hooks.capture_union, "AROUND"),
                                         (hooks.AUX_MODULE, hooks.AUX_NAME, hooks.add_dflash_aux_config, "AFTER")))
    hooks.register_hooks()
    assert list(HookRegistry._hooks) == [f"{hooks.AUX_MODULE}.{hooks.AUX_NAME}"]
    assert "can resolve arguments but not serve: f (No module named 'sglang.srt.no_such_module')" in caplog.text


def test_hooks_apply_and_reach_modules_that_imported_the_names_earlier():
    from sglang.srt.model_executor.model_runner_components import attention_backend_setup, spec_aux_hidden_state
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    for module, name, hook, _ in hooks.HOOKS:
        assert f"{module}.{name}" in HookRegistry._patched
    assert model_runner.resolve_spec_aux_hidden_state_config is spec_aux_hidden_state.resolve_spec_aux_hidden_state_config
    assert model_runner.resolve_spec_aux_hidden_state_config.__wrapped__ is not None
    assert model_runner.configure_aux_hidden_state_capture is attention_backend_setup.configure_aux_hidden_state_capture
    assert model_runner.configure_aux_hidden_state_capture.__wrapped__ is not None
    assert DefaultPoolConfigurator.__init__.__wrapped__ is not None


class CapturingModel:
    """What the capture hook touches on a target model: SGLang's Llama/Qwen3 setter semantics (HF id + 1)."""

    def __init__(self, num_layers):
        self.config = type("Config", (), {"num_hidden_layers": num_layers})()
        self.calls = []

    def set_eagle3_layers_to_capture(self, layer_ids=None):
        self.calls.append(("eagle3", layer_ids))
        self.layers_to_capture = [2, self.config.num_hidden_layers // 2, self.config.num_hidden_layers - 3] \
            if layer_ids is None else [i + 1 for i in layer_ids]

    def set_dflash_layers_to_capture(self, layer_ids):
        self.calls.append(("dflash", layer_ids))
        self.layers_to_capture = [i + 1 for i in layer_ids]


def test_capture_hook_sets_the_union_once_and_records_the_columns():
    model = CapturingModel(36)
    model_runner.configure_aux_hidden_state_capture(
        model=model, eagle_use_aux_hidden_state=True, eagle_aux_hidden_state_layer_ids=[1, 17, 32],
        dflash_use_aux_hidden_state=True, dflash_target_layer_ids=[1, 9, 17, 25, 33], is_dspark=False)
    assert model.layers_to_capture == [2, 10, 18, 26, 33, 34]
    assert model.calls == [("eagle3", [1, 9, 17, 25, 32, 33])]
    layout = getattr(model, hooks.LAYOUT_ATTRIBUTE)
    assert isinstance(layout, AuxLayout)
    assert layout.eagle3_columns == (0, 2, 4) and layout.dflash_columns == (0, 1, 2, 3, 5)


def test_capture_hook_leaves_single_drafter_runs_to_sglang():
    model = CapturingModel(36)
    model_runner.configure_aux_hidden_state_capture(
        model=model, eagle_use_aux_hidden_state=False, eagle_aux_hidden_state_layer_ids=None,
        dflash_use_aux_hidden_state=True, dflash_target_layer_ids=[1, 9], is_dspark=False)
    assert model.calls == [("dflash", [1, 9])] and not hasattr(model, hooks.LAYOUT_ATTRIBUTE)


def test_server_args_resolve_with_tiny_local_models(whiflash_env, models):
    import os

    server_args = resolve(serve_args(models))
    args = resolved_view(server_args)
    assert args.speculative_algorithm == "WHIFLASH"
    assert args.speculative_num_draft_tokens == BLOCK  # the uniform verify width is the DFlash block
    assert (args.speculative_num_steps, args.speculative_eagle_topk) == (6, 4)
    assert args.speculative_dflash_block_size == BLOCK
    assert args.disable_overlap_schedule is True
    assert args.max_running_requests == 48
    settings = resolved_settings(os.environ)
    assert settings.dflash_path == str(models / "dflash") and settings.dflash_block_size == BLOCK
    assert settings.policy == "heuristic" and settings.catch_up == "eager"
    assert SpeculativeAlgorithm.from_string("WHIFLASH").create_worker(server_args).__name__ == "WhiFlashWorker"


def test_explicit_tree_flags_are_kept_and_the_policy_env_wins(whiflash_env, models):
    import os

    whiflash_env.setenv(POLICY_ENV, "entropy")
    args = resolved_view(resolve(serve_args(
        models, "--speculative-num-steps", "7", "--speculative-eagle-topk", "1", "--max-running-requests", "4")))
    assert (args.speculative_num_steps, args.speculative_eagle_topk, args.speculative_num_draft_tokens) == (7, 1, 8)
    assert args.max_running_requests == 4
    assert resolved_settings(os.environ).policy == "entropy"


def test_overlap_scheduling_cannot_create_the_worker(models):
    args = prepare_server_args(serve_args(models))  # unresolved: the overlap schedule is still on
    with pytest.raises(ValueError, match="does not support overlap"):
        SpeculativeAlgorithm.from_string("WHIFLASH").create_worker(args)


@pytest.mark.parametrize(("config", "extra", "message"), [
    ({"policy": "nope"}, (), "unknown routing policy 'nope'; installed policies: entropy, heuristic, mlp"),
    ({"policy_params": {"bogus": 1}}, (), "bad parameters for policy 'heuristic'"),
    ({"dflash_path": ""}, (), "dflash_path is required"),
    ({"dflash_path": "/nonexistent/dflash"}, (), "cannot read the drafter config at /nonexistent/dflash"),
    ({"catch_up": "sometimes"}, (), "catch_up must be one of eager"),
    ({"block": 4}, (), "unknown key\\(s\\) block"),
    ({}, ("--pp-size", "2"), "does not support --pp-size"),
    ({}, ("--enable-hierarchical-cache",), "does not support --enable-hierarchical-cache"),
    ({}, ("--speculative-use-rejection-sampling",), "does not support --speculative-use-rejection-sampling"),
    ({}, ("--speculative-num-draft-tokens", "5"), "--speculative-num-draft-tokens 5 differs from the DFlash block"),
    ({}, ("--speculative-dflash-block-size", "6", "--speculative-eagle-topk", "1", "--speculative-num-steps", "3"),
     "--speculative-eagle-topk 1 drafts a chain, which must fill the width 6: set --speculative-num-steps 5"),
])
def test_bad_configurations_fail_with_a_clear_message(whiflash_env, models, config, extra, message):
    values = {"dflash_path": str(models / "dflash"), **config}
    whiflash_env.setenv(CONFIG_ENV, json.dumps(values))
    with pytest.raises(WhiFlashError, match=message):
        resolve(serve_args(models, *extra))


def test_the_drafters_must_be_the_right_kinds(whiflash_env, models):
    whiflash_env.setenv(CONFIG_ENV, json.dumps({"dflash_path": str(models / "eagle3")}))
    with pytest.raises(WhiFlashError, match="not a DFlash drafter"):
        resolve(serve_args(models))
    whiflash_env.setenv(CONFIG_ENV, json.dumps({"dflash_path": str(models / "dflash")}))
    args = serve_args(models)
    args[args.index("--speculative-draft-model-path") + 1] = str(models / "dflash")
    with pytest.raises(WhiFlashError, match="not an EAGLE-3 drafter"):
        resolve(args)


def test_missing_config_and_missing_eagle_drafter_are_named(whiflash_env, models):
    whiflash_env.delenv(CONFIG_ENV)
    with pytest.raises(WhiFlashError, match="WHIFLASH needs WHIFLASH_CONFIG"):
        resolve(serve_args(models))
    with pytest.raises(WhiFlashError, match="needs --speculative-draft-model-path"):
        resolve(["--model-path", str(models / "target"), "--speculative-algorithm", "WHIFLASH",
                             "--device", "cpu"])


def test_a_spawned_child_registers_through_the_entry_point_and_reads_the_resolved_settings(whiflash_env, models):
    import sglang_probe

    resolve(serve_args(models))  # resolves in this process and publishes to the environment
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        child = pool.apply(sglang_probe.probe)
    assert "Unknown speculative algorithm name: WHIFLASH" in child["before"]
    assert child["after"] == "WhiflashSpecAlgo('WHIFLASH')"
    assert json.loads(child["settings"])["dflash_block_size"] == BLOCK
    assert set(child["patched"]) >= {f"{module}.{name}" for module, name, _, _ in hooks.HOOKS}


def test_target_aux_config_gets_the_dflash_half_next_to_eagle3s(whiflash_env, models):
    """The AFTER hook on the real resolver, in a process with published settings (as a scheduler has)."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import publish, reset_context

    server_args = resolve(serve_args(models))
    publish(server_args, role="scheduler")
    try:
        whiflash = SpeculativeAlgorithm.from_string("WHIFLASH")
        config = model_runner.resolve_spec_aux_hidden_state_config(
            server_args=server_args, model_config=ModelConfig.from_server_args(server_args),
            spec_algorithm=whiflash, is_draft_worker=False)
        draft_side = model_runner.resolve_spec_aux_hidden_state_config(
            server_args=server_args, model_config=ModelConfig.from_server_args(server_args),
            spec_algorithm=whiflash, is_draft_worker=True)
    finally:
        reset_context()
    assert config.eagle_use_aux_hidden_state and config.eagle_aux_hidden_state_layer_ids == [0, 1, 2]
    assert config.eagle_draft_num_layers == 1
    assert config.dflash_use_aux_hidden_state and config.dflash_target_layer_ids == [1, 2]
    assert config.dflash_draft_num_layers == 1
    assert config.draft_model_config.model_path == str(models / "eagle3")  # EAGLE-3's private pool stays sized by it
    assert not draft_side.dflash_use_aux_hidden_state  # draft runners are left alone


def test_the_routing_list_is_sent_whole_other_customized_info_token_sliced():
    from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer

    is_request_level = SchedulerOutputStreamer.is_request_level_customized_info_key
    assert is_request_level.__wrapped__ is not None
    assert is_request_level(object.__new__(SchedulerOutputStreamer), hooks.PARADIGMS_META_KEY)
    assert not is_request_level(object.__new__(SchedulerOutputStreamer), "per_token_info")
