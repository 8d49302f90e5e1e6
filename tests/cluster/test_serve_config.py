"""deploy/ray/serve_config.yaml is a valid Ray Serve config whose application builds, and
the application's args follow the `loraplex serve` option rules. No Ray cluster needed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest

from loraplex import settings
from loraplex.rules import InvalidFieldError

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "ray" / "serve_config.yaml"
README = Path(__file__).resolve().parents[2] / "README.md"


def _schema(raw: dict[str, Any]) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)


def test_serve_config_is_valid_and_builds() -> None:
    pytest.importorskip("ray")
    import yaml
    from ray import serve

    from loraplex.cluster.app import GRPC_SERVICERS, build_app

    schema = _schema(yaml.safe_load(CONFIG.read_text()))
    (app,) = schema.applications
    assert app.import_path == "loraplex.cluster.app:build_app"
    assert {d.name for d in app.deployments} == {"Replica", "Ingress"}  # the names app.py gives them
    assert list(schema.grpc_options.grpc_servicer_functions) == list(GRPC_SERVICERS)
    for path in GRPC_SERVICERS:  # importable wherever loraplex is installed (the proxy imports them)
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))
    assert isinstance(build_app(app.args), serve.Application)


def test_the_readme_serve_config_is_the_same_application() -> None:
    """The README's short Serve config validates and builds, and says what the full one says."""
    pytest.importorskip("ray")
    import yaml
    from ray import serve

    from loraplex.cluster.app import build_app

    (block,) = re.findall(r"^```yaml\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    short, full = _schema(yaml.safe_load(block)), _schema(yaml.safe_load(CONFIG.read_text()))
    (app,), (full_app,) = short.applications, full.applications
    assert (app.name, app.import_path) == (full_app.name, full_app.import_path)
    assert list(short.grpc_options.grpc_servicer_functions) == list(full.grpc_options.grpc_servicer_functions)
    assert {d.name for d in app.deployments} <= {d.name for d in full_app.deployments}
    assert isinstance(build_app(app.args), serve.Application)


def test_application_args_follow_the_option_rules() -> None:
    values, sources = settings.resolve_mapping({"model": "/m", "max_loras": 4, "adapter_root": ["/a"]}, "args", environ={})
    assert (values["model"], values["max_loras"], values["adapter_root"]) == ("/m", 4, ("/a",))
    assert sources["max_loras"] == "args" and sources["port"] == "default"
    with pytest.raises(ValueError, match="unknown option max_lora"):
        settings.resolve_mapping({"model": "/m", "max_lora": 4}, "args", environ={})
    with pytest.raises(ValueError, match="not an integer"):
        settings.resolve_mapping({"model": "/m", "max_loras": "4"}, "args", environ={})
    values, _ = settings.resolve_mapping({"model": "/m"}, "args", environ={"LORAPLEX_MAX_LORAS": "3"})
    assert values["max_loras"] == 3  # LORAPLEX_* variables apply below the args


def test_cluster_options_are_checked() -> None:
    pytest.importorskip("ray")
    from loraplex.cluster.app import ClusterOptions

    args = {"model": "/m", "replicas": 2, "max_adapters_per_replica": 8}
    assert ClusterOptions.pop_from(args) == ClusterOptions(replicas=2, max_adapters_per_replica=8)
    assert args == {"model": "/m"}
    with pytest.raises(InvalidFieldError, match="max_replicas"):
        ClusterOptions(replicas=3, max_replicas=2)


def test_the_cluster_refuses_tokens_it_cannot_check() -> None:
    pytest.importorskip("ray")
    from loraplex.cluster.app import build_app

    with pytest.raises(InvalidFieldError, match="bearer tokens are not checked through Ray Serve"):
        build_app({"model": "/m", "auth_token": ["secret"]})


def test_the_cluster_refuses_tenants_and_tls_it_cannot_enforce(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from loraplex.cluster.app import build_app

    tenants, cert, key = tmp_path / "tenants.toml", tmp_path / "server.crt", tmp_path / "server.key"
    for f in (tenants, cert, key):
        f.write_text("")
    with pytest.raises(InvalidFieldError, match="tenants are not enforced through Ray Serve"):
        build_app({"model": "/m", "tenants": str(tenants)})
    with pytest.raises(InvalidFieldError, match="terminate TLS in front of them"):
        build_app({"model": "/m", "tls_cert": str(cert), "tls_key": str(key)})
