"""Every planning setting is declared once (deploy/settings.py), and the commands are generated from it."""

import dataclasses

import click
import pytest

from lcserve.deploy import settings
from lcserve.deploy.hardware import resolve_profile
from lcserve.deploy.plan import PlanRequest, plan_deployment
from lcserve.errors import PlanError
from lcserve.model_config import read_model
from tests.unit.test_deploy_plan import LLAMA, write_adapter, write_model


def emitted_flags(plan) -> set[str]:
    return {"--" + key for key in plan.vllm_options()}


def test_every_flag_the_plan_can_emit_is_declared_exactly_once(tmp_path):
    """Plans that reach every branch of `vllm_options`: adapters, TP, PP across nodes (Ray), fp8 KV,
    YaRN, a CPU plan. Each flag they emit is a setting or a derived flag, never both, never twice."""
    from lcserve.adapters.reader import read_adapter

    llama = read_model(write_model(tmp_path / "llama", LLAMA))
    adapter = read_adapter(write_adapter(tmp_path / "a", 8, ["q_proj", "v_proj"]))
    gpu = resolve_profile("h100-80gb", gpus=2)
    plans = [
        plan_deployment(resolve_profile("cpu"), llama, [adapter], PlanRequest(kv_cache_gib=1)),
        plan_deployment(gpu, llama, [adapter], PlanRequest(tensor_parallel_size=2, kv_cache_dtype="fp8")),
        plan_deployment(gpu, llama, [], PlanRequest(nodes=2, max_model_len=16384, rope_scaling="yarn")),
    ]
    emitted = set().union(*(emitted_flags(p) for p in plans))
    declared = [*settings.VLLM_FLAGS, *settings.DERIVED_FLAGS]
    assert len(declared) == len(set(declared))
    assert emitted <= set(declared), sorted(emitted - set(declared))
    assert set(declared) <= emitted, sorted(set(declared) - emitted)  # and none is declared for nothing


def test_a_setting_declared_twice_is_refused():
    again = dataclasses.replace(settings.BY_NAME["max_num_seqs"], name="max_num_batched_tokens")
    with pytest.raises(ValueError, match="declared twice"):
        settings.check_declarations((*settings.SETTINGS, again))
    alias = dataclasses.replace(settings.BY_NAME["block_size"], flags=("--block-size", "--tp"))
    with pytest.raises(ValueError, match="--tp is declared twice"):
        settings.check_declarations(tuple(alias if s.name == "block_size" else s for s in settings.SETTINGS))
    with pytest.raises(ValueError, match="not a PlanRequest field"):
        settings.check_declarations((dataclasses.replace(again, name="no_such_field"),))
    assert settings.check_declarations(settings.SETTINGS) == settings.BY_NAME


@pytest.mark.parametrize("command", ["plan", "render", "check"])
def test_the_deploy_commands_take_every_setting(command):
    from lcserve.deploy.cli import deploy

    params = {p.name: p for p in deploy.commands[command].params}
    for s in settings.SETTINGS:
        assert s.name in params and tuple(params[s.name].opts) == s.flags, s.name
    assert "vllm_args" in params  # and the vLLM arguments after --


def test_serve_takes_every_setting_but_the_cluster_ones_and_the_environments():
    from lcserve.serving.cli import serve

    params = {p.name: p for p in serve.params}
    for s in settings.SETTINGS:
        if settings.SERVE in s.commands and not s.env:
            assert s.name in params and tuple(params[s.name].opts) == s.flags, s.name
        else:
            assert s.name not in params, s.name


def test_only_the_first_flag_of_each_setting_is_in_the_help():
    from lcserve.deploy.cli import deploy

    ctx = click.Context(deploy.commands["plan"])
    help_text = deploy.commands["plan"].get_help(ctx)
    for s in settings.SETTINGS:
        assert s.flag in help_text
        for alias in s.flags[1:]:
            assert f"{alias} " not in help_text and f"{alias}," not in help_text, alias


def test_values_are_checked_against_their_declaration():
    settings.check_values(PlanRequest(max_num_seqs=1, slo_ttft_ms=0.5))
    for request, words in (
        (PlanRequest(max_num_seqs=0), "{max_num_seqs} 0: must be at least 1"),
        (PlanRequest(slo_itl_ms=0.0), "{slo_itl_ms} 0: a latency target must be above 0 ms"),
        (PlanRequest(max_model_len=-5), "{max_model_len} -5: must be a positive number of tokens"),
        (PlanRequest(kv_cache_dtype="int3"), "{kv_cache_dtype} int3: choose one of"),
    ):
        with pytest.raises(PlanError) as e:
            settings.check_values(request)
        assert e.value.template.startswith(words), e.value.template


def test_each_command_words_a_setting_as_its_user_typed_it():
    deploy, serve = settings.argument_names(settings.DEPLOY), settings.argument_names(settings.SERVE)
    script = settings.argument_names(settings.SERVE, positional=True)
    assert deploy["kv_cache_gib"] == "--kv-cache-gib" and serve["kv_cache_gib"] == "VLLM_CPU_KVCACHE_SPACE"
    assert deploy["training_ratio_warn"] == "--training-ratio-warn" == serve["training_ratio_warn"]
    assert script["max_model_len"] == "MAX_MODEL_LEN" and script["tensor_parallel_size"] == "--tensor-parallel-size"
    error = PlanError("{kv_cache_gib} 0: must be from 1", "kv_cache_gib")
    assert error.worded(serve) == "VLLM_CPU_KVCACHE_SPACE 0: must be from 1"


def test_serve_vllm_sh_maps_its_positions_to_the_declared_flags():
    """serve_vllm.sh is bash (it checks its arguments before Python exists): its mapping is read back
    here and held to the declarations."""
    from pathlib import Path

    script = (Path(__file__).parents[2] / "serve_vllm.sh").read_text()
    usage = next(line for line in script.splitlines() if line.startswith("Usage: ./serve_vllm.sh"))
    names = [settings.BY_NAME[n].positional for n in settings.SCRIPT_ARGUMENTS]
    assert " ".join(f"[{n}]" for n in ["MODEL", "PORT", *names]) in usage
    for i, name in enumerate(settings.SCRIPT_ARGUMENTS, start=2):
        s = settings.BY_NAME[name]
        assert f'{s.positional}="${{positional[{i}]:-auto}}"' in script, s.positional
        assert f'is_auto "${s.positional}" || args+=({s.flag} "${s.positional}")' in script, s.positional
