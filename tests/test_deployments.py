"""Deployment specs from TOML, policies and SLO verdicts, and the reconcile rule (daemon/deployments.py)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from daemon.deployments import (
    SLO,
    CanaryPolicy,
    DeploymentError,
    DeploymentSpec,
    DrainReplica,
    Log,
    RemoveVersion,
    ReplicaState,
    ReplicaView,
    RollingPolicy,
    SetReplicas,
    SetWeight,
    StartReplica,
    StopReplica,
    VersionSpec,
    VersionStats,
    apply_actions,
    check_spec_update,
    judge,
    parse_deployments,
    parse_policy,
    reconcile,
)

CONFIG = """
[[deployments]]
name = "chat"
min_replicas = 2

[[deployments.versions]]
version = "v1"
model = "/models/smollm2-135m"
replicas = 2
weight = 90

[[deployments.versions]]
version = "v2"
model = "smollm2"
replicas = 1
weight = 10
max_model_len = 2048
dtype = "bfloat16"

[[deployments]]
name = "embed"
[[deployments.versions]]
version = "a"
model = "/models/e"
"""


def deployments(text: str):
    return parse_deployments(tomllib.loads(text)["deployments"])


def test_parse_the_toml_shape():
    chat, embed = deployments(CONFIG)
    assert chat.name == "chat" and chat.min_replicas == 2
    assert chat.weights() == {"v1": 90.0, "v2": 10.0}
    assert chat.version("v2") == VersionSpec("v2", "smollm2", 1, 10.0, 2048, "bfloat16")
    assert embed.versions == (VersionSpec("a", "/models/e", replicas=1, weight=100.0),)
    assert embed.min_replicas is None


def test_spec_round_trips_through_dict():
    for spec in deployments(CONFIG):
        assert DeploymentSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("text, message", [
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\n'
     '[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"', "duplicate deployment"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\n'
     '[[deployments.versions]]\nversion="v"\nmodel="n"', "duplicate version"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\nweight=0', "weight > 0"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\nreplicas=-1', "replicas"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\nreplicas=true', "replicas"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\nreplicas=0', "0 replicas"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\nweight=-1', "weight"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\nweight=nan', "weight"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\ndtype="int4"', "dtype"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\nmax_model_len=0', "max_model_len"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"\nmodel="m"\ncolour=1', "unknown setting"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v"', "missing model"),
    ('[[deployments]]\nname="a"\n[[deployments.versions]]\nversion="v w"\nmodel="m"', "version name"),
    ('[[deployments]]\nname="a b"\n[[deployments.versions]]\nversion="v"\nmodel="m"', "deployment name"),
    ('[[deployments]]\nname="a"\nversions=[]', "at least one version"),
    ('[[deployments]]\nname="a"\nversions="v1"', "list of tables"),
    ('[[deployments]]\nname="a"\nmin_replicas=-2\n[[deployments.versions]]\nversion="v"\nmodel="m"', "min_replicas"),
])
def test_bad_definitions_say_what_is_wrong(text, message):
    with pytest.raises(DeploymentError, match=message):
        deployments(text)


def test_deployments_must_be_an_array():
    with pytest.raises(DeploymentError, match="array"):
        parse_deployments({"name": "a"})


def test_weights_are_relative_and_may_be_zero_for_some():
    spec = DeploymentSpec("d", (VersionSpec("a", "m", 1, 3), VersionSpec("b", "m", 0, 0)))
    assert spec.weights() == {"a": 3.0, "b": 0.0}


def test_admin_edits_may_change_weights_not_checkpoints():
    old = DeploymentSpec("d", (VersionSpec("a", "m1", 2, 100),))
    check_spec_update(old, DeploymentSpec("d", (VersionSpec("a", "m1", 3, 50), VersionSpec("b", "m2", 1, 50))))
    with pytest.raises(DeploymentError, match="new version"):
        check_spec_update(old, DeploymentSpec("d", (VersionSpec("a", "m2", 2, 100),)))
    with pytest.raises(DeploymentError, match="rename"):
        check_spec_update(old, DeploymentSpec("e", (VersionSpec("a", "m1", 2, 100),)))


def test_apply_actions_edits_desired_state_only():
    spec = DeploymentSpec("d", (VersionSpec("a", "m", 2, 100), VersionSpec("b", "m", 0, 0)))
    out = apply_actions(spec, [SetReplicas("b", 2), SetWeight("b", 100), SetWeight("a", 0), RemoveVersion("a"),
                               StartReplica("d", "b"), Log("x", {})])
    assert out.versions == (VersionSpec("b", "m", 2, 100),)


def views(*specs: tuple[str, str, ReplicaState]) -> list[ReplicaView]:
    return [ReplicaView(rid, version, state) for rid, version, state in specs]


def test_reconcile_starts_what_is_missing_and_releases_drained():
    spec = DeploymentSpec("d", (VersionSpec("a", "m", 3, 100),))
    replicas = views(("r1", "a", ReplicaState.UP), ("r2", "a", ReplicaState.DRAINED),
                     ("r3", "a", ReplicaState.DEAD), ("r4", "a", ReplicaState.DRAINING))
    assert reconcile(spec, replicas) == [StopReplica("r2"), StartReplica("d", "a"), StartReplica("d", "a")]


def test_reconcile_sheds_cheapest_first_and_drains_versions_gone():
    spec = DeploymentSpec("d", (VersionSpec("a", "m", 1, 100),))
    replicas = views(("r1", "a", ReplicaState.UP), ("r2", "a", ReplicaState.LOADING), ("r3", "a", ReplicaState.UP),
                     ("r0", "a", ReplicaState.PENDING), ("x1", "old", ReplicaState.UP),
                     ("x2", "old", ReplicaState.LOADING))
    assert reconcile(spec, replicas) == [StopReplica("r0"), StopReplica("r2"), DrainReplica("r1"),
                                         StopReplica("x2"), DrainReplica("x1")]


def test_reconcile_is_quiet_when_converged():
    spec = DeploymentSpec("d", (VersionSpec("a", "m", 2, 100),))
    assert reconcile(spec, views(("r1", "a", ReplicaState.UP), ("r2", "a", ReplicaState.LOADING))) == []


def test_policies_parse_and_check():
    canary = parse_policy(CanaryPolicy, {"steps": [10, 100], "dwell_s": 5, "slo": {"max_p99_ttft_s": 0.5}})
    assert canary.steps == (10.0, 100.0) and canary.slo.max_p99_ttft_s == 0.5
    assert parse_policy(RollingPolicy, None) == RollingPolicy()
    for bad in ({"steps": [50, 25, 100]}, {"steps": [5, 50]}, {"steps": []}, {"min_requests": 0},
                {"slo": {"max_error_rate": -1}}, {"colour": 1}):
        with pytest.raises(DeploymentError):
            parse_policy(CanaryPolicy, bad)
    with pytest.raises(DeploymentError):
        parse_policy(RollingPolicy, {"max_surge": -1})


def test_judge_outcomes():
    slo = SLO(max_error_rate=0.05, p99_ttft_vs_stable=1.5, p99_itl_vs_stable=None)
    stable = VersionStats(200, 0, 0.2, 0.02)
    assert judge(slo, VersionStats(10, 0, 0.1, 0.01), stable, 100).outcome == "insufficient"
    ok = judge(slo, VersionStats(200, 2, 0.25, 0.5), stable, 100)
    assert ok.outcome == "ok" and ok.numbers["canary"]["error_rate"] == 0.01
    bad = judge(slo, VersionStats(200, 20, 0.4, 0.01), stable, 100)
    assert bad.outcome == "breach" and len(bad.breaches) == 2
    assert "error_rate 0.1 > 0.05" in bad.breaches[0] and "1.5x stable" in bad.breaches[1]
    # a stable version with too few requests cannot be compared against: only absolute limits apply
    assert judge(slo, VersionStats(200, 0, 9.0, 0.01), VersionStats(5, 0, 0.1, 0.01), 100).outcome == "ok"


def test_the_example_config_loads_with_and_without_its_deployments_block(tmp_path):
    from daemon.config import ConfigError, load_config

    example = Path(__file__).resolve().parent.parent / "systemd" / "nimbus.toml"
    assert load_config(example).deployments == ()  # commented out: the deployment of [model]
    text = example.read_text()
    block = text[text.index("# [[deployments]]"):]
    enabled = text.replace(block, "\n".join(line.removeprefix("# ") for line in block.splitlines()))
    (tmp_path / "on.toml").write_text(enabled)
    (spec,) = load_config(tmp_path / "on.toml").deployments
    assert spec.name == "chat" and spec.min_replicas == 2 and spec.version("v1").replicas == 2
    (tmp_path / "bad.toml").write_text(enabled.replace("replicas = 2\n", "replicas = -1\n"))
    with pytest.raises(ConfigError, match="replicas"):
        load_config(tmp_path / "bad.toml")


def test_fault_settings_are_checked_where_the_version_is_defined():
    assert VersionSpec("v", "/m", fault="error-rate=0.5").fault == "error-rate=0.5"
    with pytest.raises(DeploymentError, match="unknown fault"):
        VersionSpec("v", "/m", fault="explode=1")
    with pytest.raises(DeploymentError, match="string"):
        VersionSpec("v", "/m", fault=3)  # type: ignore[arg-type]


@pytest.mark.parametrize(("setting", "message"), [
    ("[scheduler]\nstream_interval_ms = -5\n", "[scheduler]: stream_interval_ms must be an int from 0 to 10000"),
    ("[scheduler]\nmax_num_seqs = 0\n", "[scheduler]: max_num_seqs must be a positive int"),
    ("[scheduler]\nbogus = 1\n", "unknown setting(s) in [scheduler]: bogus"),
])
def test_nimbus_serve_refuses_bad_settings_with_their_message(tmp_path, setting, message):
    config = tmp_path / "bad.toml"
    config.write_text(setting)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "daemon.cli", "serve", "--config", str(config), "--port", "1"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
