"""What puts the pipeline into production: prefect.yaml, the work pool, the worker's systemd unit,
cloud-init, and the least-privilege IAM policy. The nightly deployment's typed parameters (the UI's
form), how they reach the config, and the runs' names go through Prefect's test harness; the rest
needs no server (tests/e2e deploys for real)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from config.load import load_config, validate_config
from deployments.iam_policy import bucket_policy
from deployments.iam_policy import main as iam_main
from flows.fanout import TRAIN_FUSION_DEPLOYMENT
from tasks.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deployments"


def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def flow_name(entrypoint: str) -> str:
    """The `@flow(name=...)` of an entrypoint "path.py:function", read without importing it."""
    path, func = entrypoint.split(":")
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "flow":
                    return next(k.value.value for k in dec.keywords if k.arg == "name")
    raise AssertionError(f"{entrypoint}: no @flow(name=...) function {func}")


def deployment_names() -> set[str]:
    return {f"{flow_name(d['entrypoint'])}/{d['name']}" for d in prefect_yaml()["deployments"]}


def test_prefect_yaml_is_valid_for_prefect():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_yaml())
    assert len(model.deployments) == 4 and all(d.name and d.entrypoint for d in model.deployments)


def test_deployments_are_the_designed_ones():
    assert deployment_names() == {
        "train-all-fusions/nightly",
        "train-fusion/fan-out",
        "evaluate-models/on-demand",
        "detect/new-media",
    }
    assert TRAIN_FUSION_DEPLOYMENT in deployment_names()  # what fan-out starts exists


def test_nightly_cron_is_set_once_at_02_utc():
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule

    text = (ROOT / "prefect.yaml").read_text()
    assert len(re.findall(r"^\s*- cron:", text, re.MULTILINE)) == 1
    by_name = {d["name"]: d for d in prefect_yaml()["deployments"]}
    [nightly_schedule] = by_name["nightly"]["schedules"]
    schedule = _schedule_config_to_deployment_schedule(nightly_schedule)["schedule"]
    assert (schedule.cron, schedule.timezone) == ("0 2 * * *", "UTC")
    assert all("schedules" not in d for name, d in by_name.items() if name != "nightly")


def test_parameters_carry_config_path_and_overrides_only():
    for dep in prefect_yaml()["deployments"]:
        assert dep["parameters"] == {"config_path": "config/config.yaml", "overrides": []}
        load_config(ROOT / dep["parameters"]["config_path"])  # the path resolves and validates


# --- the nightly deployment's parameters and run names ------------------------------------------

NIGHTLY_ENTRYPOINT = "flows/train_all_fusions.py:train_all_fusions"
TINY = """
storage:
  uri: {bucket}
data:
  n_mels: 32
  spec_frames: 32
  image_size: 32
  shard_size: 32
generator:
  fill_empty_dataset: true
  n_pairs: 96
training:
  epochs: 3
  log_every: 2
"""


def nightly_yaml() -> dict:
    return next(d for d in prefect_yaml()["deployments"] if d["name"] == "nightly")


def only_branch(prop: dict) -> dict:
    """The non-null branch of an optional parameter's `anyOf`."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    assert len(branches) == 1, prop
    return branches[0]


@pytest.mark.usefixtures("prefect_harness")
def test_nightly_deployment_offers_a_typed_form(monkeypatch) -> None:
    """Deployed as `prefect deploy` does it (the flow loaded from its entrypoint), the server
    holds a typed schema: the UI draws a choice of fusions, a number for epochs, a list of
    overrides; prefect.yaml's parameters fit it, and a bad value is refused naming it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(ROOT)
    nightly = load_flow_from_entrypoint(NIGHTLY_ENTRYPOINT)
    params = nightly_yaml()["parameters"]
    deployment_id = nightly.to_deployment(name="nightly", parameters=params).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        schema = deployment.parameter_openapi_schema
        props = schema["properties"]
        assert list(props) == ["config_path", "overrides", "fusions", "epochs", "dataset_prefix"]
        assert props["config_path"] == {**props["config_path"], "type": "string",
                                        "default": "config/config.yaml"}  # fmt: skip
        fusions = only_branch(props["fusions"])
        assert fusions["type"] == "array"
        assert fusions["items"] == {"enum": ["early", "mid", "late"], "type": "string"}
        assert only_branch(props["epochs"]) == {"type": "integer", "minimum": 1}
        assert only_branch(props["dataset_prefix"]) == {"type": "string"}
        overrides = only_branch(props["overrides"])
        assert overrides["type"] == "array" and overrides["items"]["type"] == "string"
        assert all(props[name].get("description") for name in props)  # help text in the form
        assert schema.get("required", []) == []  # a plain run needs no parameter
        assert deployment.enforce_parameter_schema
        assert deployment.parameters == params == {"config_path": "config/config.yaml",
                                                   "overrides": []}  # fmt: skip

        # prefect.yaml's parameters, and typed ones, pass the server's check; bad ones do not
        client.create_flow_run_from_deployment(deployment_id)
        client.create_flow_run_from_deployment(
            deployment_id, parameters={"fusions": ["late"], "epochs": 2}
        )
        for bad, field in (
            ({"fusions": ["mixed"]}, "fusions[0]"),
            ({"epochs": 0}, "epochs"),
            ({"overrides": ["epochs"]}, "overrides[0]"),
        ):
            with pytest.raises(PrefectHTTPStatusError, match="409") as err:
                client.create_flow_run_from_deployment(deployment_id, parameters=bad)
            detail = err.value.response.json()["detail"]
            assert f"Validation failed for field '{field}'" in detail, detail


@pytest.mark.usefixtures("prefect_harness")
def test_bad_parameter_fails_the_run_naming_the_parameter(tmp_path) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.train_all_fusions import train_all_fusions

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(bucket=tmp_path / "bucket"))
    with pytest.raises(
        ParameterTypeError, match=r"- fusions\.0: Input should be 'early', 'mid' or 'late'"
    ):
        train_all_fusions(config_path=str(cfg), fusions=["mixed"])
    with pytest.raises(
        ParameterTypeError, match=r"- epochs: Input should be greater than or equal to 1"
    ):
        train_all_fusions(config_path=str(cfg), epochs=0)
    with pytest.raises(ParameterTypeError, match=r"- overrides\.0: String should match pattern"):
        train_all_fusions(config_path=str(cfg), overrides=["training.epochs"])
    # what only the config can judge is refused by it, named as the parameter that set it
    with pytest.raises(ConfigError, match="^parameter dataset_prefix: storage.dataset_prefix: "):
        train_all_fusions(config_path=str(cfg), dataset_prefix="/abs/")
    with pytest.raises(ConfigError, match="^parameter fusions: training.fusions: names a fusion "):
        train_all_fusions(config_path=str(cfg), fusions=["late", "late"])
    assert not (tmp_path / "bucket").exists()  # refused before any work


@pytest.mark.usefixtures("prefect_harness")
def test_typed_parameters_reach_the_config_and_name_the_runs(tmp_path) -> None:
    """fusions, epochs and dataset_prefix become overrides of the config (which says 3 epochs of
    every fusion): one epoch of late on a dataset under media/; the runs are named for it."""
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.train_all_fusions import train_all_fusions
    from tasks.io.layout import Layout

    bucket = tmp_path / "bucket"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(bucket=bucket))
    state = train_all_fusions(
        config_path=str(cfg),
        fusions=["late"],
        epochs=1,
        dataset_prefix="media/",
        overrides=["training.batch_size=8"],
        return_state=True,
    )
    summary = state.result()
    assert summary.fusions == ["late"] and set(summary.metrics) == {"late"}
    layout = Layout(dataset="media/")
    assert (bucket / layout.checkpoint("late", summary.run, 1)).is_file()
    assert not (bucket / layout.checkpoint("late", summary.run, 2)).exists()
    assert not (bucket / layout.model("early", summary.run)).exists()
    assert any((bucket / "media").rglob("*.wav")) and not (bucket / "dataset").exists()

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert flow_run.name == f"local {datetime.now(UTC):%Y-%m-%d} late 1 epoch"
    assert "train-late" in {t.name for t in task_runs}


@pytest.mark.usefixtures("prefect_harness")
def test_train_fusion_runs_are_named_for_what_they_train(tmp_path) -> None:
    from prefect import flow
    from prefect.runtime import flow_run

    from flows.train_fusion import run_name

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY.format(bucket=tmp_path / "bucket"))

    @flow(name="train-fusion-name-test", flow_run_name=run_name)
    def named(
        config_path: str, fusion: str, run: str | None = None, overrides: list[str] | None = None
    ) -> str:
        return str(flow_run.name)

    assert named(str(cfg), "early") == "early 3 epochs"
    assert named(str(cfg), "mid", "r1", ["training.epochs=1"]) == "mid 1 epoch run r1"
    assert named(str(cfg), "late", None, ["training.epochs=zero"]) == "late (invalid config)"


def test_pull_step_sets_the_project_directory():
    spec = prefect_yaml()
    [build] = spec["build"]
    step = build["prefect.deployments.steps.run_shell_script"]
    assert step["id"] == "project" and "DEEPFAKE_PROJECT_DIR" in step["script"]
    [pull] = spec["pull"]
    assert pull == {
        "prefect.deployments.steps.set_working_directory": {"directory": "{{ project.stdout }}"}
    }
    for dep in spec["deployments"]:
        env = dep["work_pool"]["job_variables"]["env"]
        assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "tasks,models,config,flows"
        assert "PYTHONPATH" not in env  # workers' venvs have the project installed
        assert "name" not in dep["work_pool"]  # the pool comes from PREFECT_DEFAULT_WORK_POOL_NAME


def default_pool() -> str:
    return tomllib.loads((ROOT / "prefect.toml").read_text())["deployments"][
        "default_work_pool_name"
    ]


def test_prefect_settings_give_the_default_pool(monkeypatch):
    from prefect.settings import Settings

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PREFECT_DEFAULT_WORK_POOL_NAME", raising=False)
    monkeypatch.delenv("PREFECT_DEPLOYMENTS_DEFAULT_WORK_POOL_NAME", raising=False)
    assert Settings().deployments.default_work_pool_name == default_pool() == "deepfake-pool"
    monkeypatch.setenv("PREFECT_DEFAULT_WORK_POOL_NAME", "other-pool")
    assert Settings().deployments.default_work_pool_name == "other-pool"


@pytest.mark.parametrize(
    ("env_pool", "arg", "expected"),
    [
        (None, None, "deepfake-pool"),
        ("env-pool", None, "env-pool"),
        ("env-pool", "arg-pool", "arg-pool"),
    ],
)
def test_work_pool_script_creates_a_process_pool(tmp_path, env_pool, arg, expected):
    fake = tmp_path / "prefect"
    fake.write_text('#!/bin/sh\necho "prefect $*"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT"] = str(fake)
    if env_pool:
        env["PREFECT_DEFAULT_WORK_POOL_NAME"] = env_pool
    out = subprocess.run(
        [str(DEPLOY / "create-work-pool.sh"), *([arg] if arg else [])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"prefect work-pool create {expected} --type process --overwrite" in out


def test_the_projects_own_settings_turn_prefect_analytics_off() -> None:
    """From the repository root, with nothing in the environment, Prefect reads analytics off
    from prefect.toml: a `python -m flows...` run's temporary API sends no telemetry (and logs
    no "Failed to send telemetry" ERROR)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    out = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "config", "view", "--show-sources"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "PREFECT_SERVER_ANALYTICS_ENABLED='False' (from prefect.toml)" in out


# --- IAM policy -----------------------------------------------------------------------------------


def resources(policy: dict) -> list[str]:
    return [
        r
        for s in policy["Statement"]
        for r in (s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]])
    ]


def test_committed_policy_is_generated_from_config_yaml(capsys):
    assert iam_main(["--config", str(ROOT / "config/config.yaml")]) == 0
    generated = json.loads(capsys.readouterr().out)
    committed = json.loads((DEPLOY / "iam-policy.json").read_text())
    assert committed == generated, (
        "regenerate: python -m deployments.iam_policy > deployments/iam-policy.json"
    )


def test_policy_grants_exactly_list_get_put_and_the_one_delete_on_the_bucket():
    policy = json.loads((DEPLOY / "iam-policy.json").read_text())
    bucket = load_config(ROOT / "config/config.yaml").storage.uri.removeprefix("s3://")
    grants = {(a, s["Resource"]) for s in policy["Statement"] for a in s["Action"]}
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])
    assert grants == {
        ("s3:ListBucket", f"arn:aws:s3:::{bucket}"),
        ("s3:GetObject", f"arn:aws:s3:::{bucket}/dataset/*"),
        ("s3:GetObject", f"arn:aws:s3:::{bucket}/outputs/*"),
        ("s3:PutObject", f"arn:aws:s3:::{bucket}/outputs/*"),
        # finish-run forgets the run in progress, the trainer prunes old checkpoints
        # (training.keep_checkpoints): nothing else is deleted
        ("s3:DeleteObject", f"arn:aws:s3:::{bucket}/outputs/runs/in-progress.json"),
        ("s3:DeleteObject", f"arn:aws:s3:::{bucket}/outputs/models/*/checkpoints/*"),
    }
    assert all(re.fullmatch(rf"arn:aws:s3:::{bucket}(/.*)?", r) for r in resources(policy))
    wildcards = ("/dataset/*", "/outputs/*", "/outputs/models/*/checkpoints/*")
    unexplained = json.dumps(policy)
    for allowed in sorted(wildcards, key=len, reverse=True):
        unexplained = unexplained.replace(allowed, "")
    assert "*" not in unexplained


def test_policy_follows_prefixes_and_every_setting_that_widens_it():
    cfg = validate_config({
        "storage": {"uri": "s3://team-bkt/deepfake", "outputs_prefix": "results/"},
        "training": {"keep_checkpoints": 3},
        "generator": {"fill_empty_dataset": True},
        "model": {"pretrained_image_weights": "weights/resnet18.pt"},
    })  # fmt: skip
    policy = bucket_policy(cfg)
    grants = {(s["Sid"], a, s["Resource"]) for s in policy["Statement"] for a in s["Action"]}
    root = "arn:aws:s3:::team-bkt/deepfake"
    assert grants == {
        ("ListTheBucket", "s3:ListBucket", "arn:aws:s3:::team-bkt"),
        ("ReadTheDataset", "s3:GetObject", f"{root}/dataset/*"),
        ("ReadAndWriteOutputs", "s3:GetObject", f"{root}/results/*"),
        ("ReadAndWriteOutputs", "s3:PutObject", f"{root}/results/*"),
        ("ForgetTheFinishedRun", "s3:DeleteObject", f"{root}/results/runs/in-progress.json"),
        ("DeleteOldCheckpoints", "s3:DeleteObject", f"{root}/results/models/*/checkpoints/*"),
        ("WriteTheDemoDataset", "s3:PutObject", f"{root}/dataset/*"),
        ("ReadPretrainedImageWeights", "s3:GetObject", f"{root}/weights/resnet18.pt"),
    }


def test_keeping_every_checkpoint_drops_the_checkpoint_delete():
    cfg = validate_config({"training": {"keep_checkpoints": None}})
    statements = bucket_policy(cfg)["Statement"]
    assert "DeleteOldCheckpoints" not in [s["Sid"] for s in statements]
    deletes = [s["Resource"] for s in statements if "s3:DeleteObject" in s["Action"]]
    assert deletes == ["arn:aws:s3:::my-deepfake-bucket/outputs/runs/in-progress.json"]


@pytest.mark.parametrize(
    "weights", [None, "imagenet", "/opt/weights/resnet18.pt", "~/resnet18.pt", "outputs/w.pt"]
)
def test_weights_read_from_elsewhere_or_already_covered_add_nothing(weights):
    cfg = validate_config({"model": {"pretrained_image_weights": weights}})
    sids = [s["Sid"] for s in bucket_policy(cfg)["Statement"]]
    assert "ReadPretrainedImageWeights" not in sids


def test_weights_key_that_escapes_the_bucket_root_is_refused():
    cfg = validate_config({"model": {"pretrained_image_weights": "../other/w.pt"}})
    with pytest.raises(ConfigError, match="model.pretrained_image_weights: '../other/w.pt' esc"):
        bucket_policy(cfg)


def test_policy_needs_an_s3_bucket(capsys):
    with pytest.raises(ConfigError, match="storage.uri: an IAM policy needs an s3:// bucket"):
        bucket_policy(validate_config({"storage": {"uri": "./bucket"}}))
    assert iam_main(["--config", str(ROOT / "config/demo.yaml")]) == 2
    assert "needs an s3:// bucket" in capsys.readouterr().err


# --- systemd unit, env file, cloud-init -----------------------------------------------------------


def verify_unit(unit_text: str, tmp_path: Path) -> str:
    """`systemd-analyze verify` on the unit with its install dir moved under tmp_path (verify
    insists that ExecStart's binary exists); returns what it printed about the unit."""
    install = tmp_path / "opt"
    (install / ".venv/bin").mkdir(parents=True)
    (install / ".venv/bin/prefect").write_text("#!/bin/sh\n")
    (install / ".venv/bin/prefect").chmod(0o755)
    unit = tmp_path / "prefect-worker.service"
    unit.write_text(unit_text.replace("/opt/deepfake-detector", str(install)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path
    )
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "prefect-worker" in ln]
    return "\n".join(lines + ([f"exit {proc.returncode}"] if proc.returncode else []))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_passes_verify(tmp_path):
    text = (DEPLOY / "prefect-worker.service").read_text()
    assert verify_unit(text, tmp_path / "good") == ""
    # The check can fail: a misspelt setting is reported.
    assert "restart specifier" in verify_unit(
        text.replace("Restart=always", "Restart=sometimes"), tmp_path / "bad"
    )


def test_systemd_unit_runs_a_restarting_worker_on_the_pool():
    text = (DEPLOY / "prefect-worker.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.MULTILINE).group(1)
    assert "prefect worker start --pool ${PREFECT_DEFAULT_WORK_POOL_NAME}" in exec_start
    assert re.search(r"^Restart=always$", text, re.MULTILINE)
    assert "EnvironmentFile=/etc/deepfake-detector/worker.env" in text


def env_keys(text: str) -> set[str]:
    return {ln.split("=", 1)[0] for ln in text.splitlines() if re.match(r"^[A-Z_]+=", ln)}


def test_env_template_holds_settings_and_no_secrets():
    keys = env_keys((DEPLOY / "worker.env.example").read_text())
    assert {
        "PREFECT_API_URL",
        "PREFECT_DEFAULT_WORK_POOL_NAME",
        "PREFECT_LOGGING_EXTRA_LOGGERS",
    } <= keys
    assert "PYTHONPATH" not in keys  # the project is installed in the worker's venv
    assert not keys & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def test_cloud_init_installs_the_project_and_starts_the_unit(tmp_path):
    text = (DEPLOY / "cloud-init.yaml").read_text()
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    files = {f["path"]: f["content"] for f in data["write_files"]}
    script = files["/usr/local/sbin/install-deepfake-worker"]
    (tmp_path / "install.sh").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "install.sh")], check=True)
    for used in (
        "deployments/prefect-worker.service",
        "deployments/create-work-pool.sh",
        "requirements.txt",
        "requirements.lock",
    ):
        assert used in script and (ROOT / used).exists()
    assert "systemctl enable prefect-worker" in script and "pip install" in script
    assert 'pip install --quiet --no-deps -e "$INSTALL_DIR"' in script  # the project itself
    assert ["/usr/local/sbin/install-deepfake-worker"] in data["runcmd"]
    worker_env = env_keys(files["/etc/deepfake-detector/worker.env"])
    assert worker_env == env_keys((DEPLOY / "worker.env.example").read_text())
