"""The Helm chart (deploy/helm/blender-chat), with no cluster and no helm binary:
helm-python-sdk renders and lints it through Helm's own Go library, every rendered
object is checked by kubernetes-validate (strict) against the two newest Kubernetes
versions it ships, and what a pod would get is handed to the bot's own settings
loader and web server. Each values file in the chart's ci/ directory is one shape."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from conftest import REPO
from kubernetes_validate.utils import SchemaNotFoundError, all_versions
from packaging.version import Version

from bot.config import SECRET_VARIABLES, Settings, load_settings
from bot.engine import ReplyEngine
from bot.memory import open_store
from bot.web import build_app

CHART = REPO / "deploy" / "helm" / "blender-chat"
CI_VALUES = {path.name.removesuffix("-values.yaml"): path for path in sorted((CHART / "ci").glob("*-values.yaml"))}
# kubernetes-validate ships a plain and a strict schema set per version: the two newest versions.
KUBE_VERSIONS = sorted(set(all_versions()), key=Version)[-2:]
RELEASE, NAMESPACE = "bc", "chat"
FULLNAME = f"{RELEASE}-blender-chat"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GaBcDe.abcdefghijklmnopqrstuvwxyz0123456789AB"  # the shape, not a real one
# What an operator created before installing ci/autoscaling-values.yaml (its existingSecret and urlSecret).
EXISTING_SECRETS = {
    "blender-chat-tokens": {"SLACK_BOT_TOKEN": "xoxb-1-existing", "SLACK_APP_TOKEN": "xapp-1-existing"},
    "blender-chat-redis": {"redis-url": "redis://:password@redis.example.svc:6379/0"},
}
# Kinds kubernetes-validate has no schema for (a CustomResourceDefinition's kind): checked by hand below.
NOT_IN_KUBERNETES = {"monitoring.coreos.com/v1": {"ServiceMonitor"}}


def render(values: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The chart's objects for `values`, in template order (NOTES.txt left out)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [
        obj
        for name, text in sorted(manifests.items())
        if name.endswith(".yaml")
        for obj in yaml.safe_load_all(text)
        if obj
    ]


def notes(values: dict[str, Any] | None) -> str:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)["blender-chat/templates/NOTES.txt"]


def ci_values(shape: str) -> dict[str, Any]:
    return yaml.safe_load(CI_VALUES[shape].read_text()) or {}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every ci/ values file rendered once for the module."""
    return {shape: render(ci_values(shape)) for shape in CI_VALUES}


def kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [obj for obj in kinds(objects, kind) if obj["metadata"]["name"] == name]
    return found


def bot_workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (workload,) = [
        obj for obj in objects
        if obj["kind"] in ("Deployment", "StatefulSet") and obj["metadata"]["name"] == FULLNAME
    ]  # fmt: skip
    return workload


def bot_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in bot_workload(objects)["spec"]["template"]["spec"]["containers"] if c["name"] == "bot"]
    return container


def pod_environment(objects: list[dict[str, Any]], index: int, data_dir: Path) -> dict[str, str]:
    """The bot container's environment in pod `index`, as the kubelet would build it from
    the rendered objects: the ConfigMap (envFrom), then `env` (Secret keys, the pod-index
    label the StatefulSet controller puts on its pods), with /data, the pod's writable
    volume, at `data_dir`."""
    workload, container = bot_workload(objects), bot_container(objects)
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert "/data" in mounts
    labels = dict(workload["spec"]["template"]["metadata"]["labels"])
    if workload["kind"] == "StatefulSet":
        labels[POD_INDEX_LABEL] = str(index)
    secrets = {obj["metadata"]["name"]: obj.get("stringData") or {} for obj in kinds(objects, "Secret")}
    secrets.update(EXISTING_SECRETS)

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(named(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
            continue
        source = variable["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = secrets.get(ref["name"], {}).get(ref["key"])
            assert value is not None or ref.get("optional"), f"the pod would not start: {ref} is missing"
            if value is not None:
                env[variable["name"]] = value
        else:
            label = re.fullmatch(r"metadata\.labels\['(.+)'\]", source["fieldRef"]["fieldPath"]).group(1)
            env[variable["name"]] = labels.get(label, "")  # a label the pod lacks gives an empty value
    data_dir.mkdir(parents=True, exist_ok=True)
    return {name: re.sub(r"^(sqlite:///)?/data\b", rf"\g<1>{data_dir}", value) for name, value in env.items()}


def pod_settings(objects: list[dict[str, Any]], index: int, data_dir: Path) -> Settings:
    return load_settings(pod_environment(objects, index, data_dir))


# -- the matrix renders, validates and lints ----------------------------------


def test_ci_has_a_values_file_for_each_shape() -> None:
    assert set(CI_VALUES) == {"default", "redis-discord", "slack-http", "autoscaling", "in-chart-redis"}
    assert ci_values("default") == {"secrets": {"webApiToken": "ci-web-token"}}  # the defaults, plus the web chat


def test_the_two_newest_kubernetes_versions_are_used() -> None:
    assert len(KUBE_VERSIONS) == 2 and Version(KUBE_VERSIONS[0]) < Version(KUBE_VERSIONS[1])
    assert KUBE_VERSIONS[-1] == sorted(all_versions(), key=Version)[-1]


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("shape", sorted(CI_VALUES))
def test_every_rendered_object_is_valid_kubernetes(rendered, shape: str, version: str) -> None:
    checked = 0
    for obj in rendered[shape]:
        if obj["kind"] in NOT_IN_KUBERNETES.get(obj["apiVersion"], ()):
            with pytest.raises(SchemaNotFoundError):  # if it ever ships one, use it
                kubernetes_validate.validate(obj, version, strict=True)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(map(str, error.path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is not valid on {version}: {path}: {error.message}")
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("shape", sorted(CI_VALUES))
def test_helm_lint_passes(shape: str, version: str) -> None:
    report = helm.lint(str(CHART), ci_values(shape), strict=True, namespace=NAMESPACE, kube_version=f"v{version}")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; "icon is recommended" (1) is all there is.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_service_monitor_scrapes_every_pod_once(rendered) -> None:
    objects = rendered["autoscaling"]
    (monitor,) = kinds(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]
    selected = [
        service for service in kinds(objects, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ]  # fmt: skip
    assert [service["metadata"]["name"] for service in selected] == [FULLNAME]
    assert [port["name"] for port in selected[0]["spec"]["ports"]] == ["http"]
    # The StatefulSet's headless Service has the bot's labels too, but not the one the monitor selects.
    sharded = rendered["redis-discord"]
    headless = named(sharded, "Service", f"{FULLNAME}-pods")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()


# -- Discord shards by pod index ----------------------------------------------


@pytest.mark.parametrize("pods", [2, 3])
def test_pod_i_serves_its_own_shards(tmp_path, pods: int) -> None:
    values = {
        "replicas": pods, "redis": {"url": "redis://redis:6379/0"},
        "discord": {"enabled": True, "shardsPerPod": 2}, "secrets": {"discordToken": DISCORD_TOKEN},
    }  # fmt: skip
    objects = render(values)
    workload = bot_workload(objects)
    assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == pods
    assert workload["spec"]["serviceName"] == named(objects, "Service", f"{FULLNAME}-pods")["metadata"]["name"]
    index_from = [v for v in bot_container(objects)["env"] if v["name"] == "DISCORD_PROCESS_INDEX"]
    from_label = {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}}
    assert index_from == [{"name": "DISCORD_PROCESS_INDEX", "valueFrom": from_label}]
    served = []
    for index in range(pods):
        settings = pod_settings(objects, index, tmp_path / f"pod-{index}")
        assert settings.discord_shard_count == 2 * pods
        assert settings.discord_shard_ids == (2 * index, 2 * index + 1)
        served += settings.discord_shard_ids
    assert sorted(served) == list(range(2 * pods))  # every shard, each by one pod


def test_one_discord_pod_is_a_deployment_without_shard_ids(tmp_path) -> None:
    objects = render({"discord": {"enabled": True}, "secrets": {"discordToken": DISCORD_TOKEN}})
    assert bot_workload(objects)["kind"] == "Deployment"
    settings = pod_settings(objects, 0, tmp_path)
    assert (settings.discord_shard_count, settings.discord_shard_ids) == (None, ())
    several = render({"discord": {"enabled": True, "shardsPerPod": 3}, "secrets": {"discordToken": DISCORD_TOKEN}})
    settings = pod_settings(several, 0, tmp_path)
    assert (settings.discord_shard_count, settings.discord_shard_ids) == (3, ())  # all three in the one process


def test_a_cluster_without_the_pod_index_label_gets_a_clear_refusal_from_the_bot(tmp_path, rendered) -> None:
    """Before Kubernetes 1.28 the label is absent: the variable is empty, and the bot says what is missing."""
    env = pod_environment(rendered["redis-discord"], 0, tmp_path)
    env["DISCORD_PROCESS_INDEX"] = ""
    with pytest.raises(ValueError, match="DISCORD_PROCESS_INDEX is missing: .*apps.kubernetes.io/pod-index"):
        load_settings(env)


# -- the rendered environment is the bot's ------------------------------------


@pytest.mark.parametrize("shape", sorted(CI_VALUES))
def test_the_rendered_environment_is_accepted_by_the_bot(tmp_path, rendered, shape: str) -> None:
    objects = rendered[shape]
    settings = pod_settings(objects, 0, tmp_path / "data")
    values = ci_values(shape)
    port = bot_container(objects)["ports"][0]
    assert (settings.http_host, settings.http_port) == ("0.0.0.0", port["containerPort"]) and port["name"] == "http"
    on_redis = "redis" in values
    if values.get("redis", {}).get("inChart", {}).get("enabled"):
        assert settings.memory_url == f"redis://{FULLNAME}-redis:6379/0"
        assert named(objects, "Service", f"{FULLNAME}-redis")["spec"]["ports"][0]["port"] == 6379
    elif on_redis:
        assert settings.memory_url.startswith("redis://") and settings.memory_path is None
    else:
        assert settings.memory_path == tmp_path / "data" / "memory.db"  # on the PersistentVolumeClaim
    assert bool(settings.discord_token) == values.get("discord", {}).get("enabled", False)
    assert bool(settings.slack_app_token) == (values.get("slack", {}).get("mode") == "socket")
    assert bool(settings.slack_signing_secret) == (values.get("slack", {}).get("mode") == "http")
    if values.get("ingress", {}).get("enabled"):
        assert settings.web_allowed_hosts == {values["ingress"]["host"]}


def test_the_model_is_baked_in_or_downloaded_by_an_init_container(rendered) -> None:
    baked = bot_workload(rendered["default"])["spec"]["template"]["spec"]
    (copy,) = baked["initContainers"]
    # The image's /data (model and conversion) copied into the volume that hides it.
    assert copy["command"] == ["cp", "-a", "-u", "/data/.", "/seed/"]
    assert {m["mountPath"]: m["name"] for m in copy["volumeMounts"]}["/seed"] == "data"
    fetched = bot_workload(rendered["in-chart-redis"])["spec"]["template"]["spec"]
    (download,) = fetched["initContainers"]
    assert download["command"] == ["blender-chat", "download"]
    assert download["envFrom"] == bot_container(rendered["in-chart-redis"])["envFrom"]  # the same model and paths
    assert {m["mountPath"]: m["name"] for m in download["volumeMounts"]}["/data"] == "data"
    assert download["image"] == bot_container(rendered["in-chart-redis"])["image"]


# -- probes, grace period, rollouts -------------------------------------------


def test_probes_use_the_bots_endpoints(rendered) -> None:
    for shape, objects in rendered.items():
        container = bot_container(objects)
        probes = {name: container[name] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert {name: probe["httpGet"] for name, probe in probes.items()} == {
            "startupProbe": {"path": "/readyz", "port": "http"},
            "livenessProbe": {"path": "/healthz", "port": "http"},
            "readinessProbe": {"path": "/readyz", "port": "http"},
        }, shape
        startup = probes["startupProbe"]
        # At least the Dockerfile's start period (180 s) for the model load.
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 180


@pytest.mark.timeout(60)
async def test_the_probes_answer_on_the_bots_own_server(tmp_path, tiny_model, make_settings, rendered) -> None:
    """The kubelet calls the pod's IP: the probe paths must answer whatever the Host, as
    the bot's web server does for them (its Host check guards the web chat only)."""
    container = bot_container(rendered["default"])
    pod = pod_settings(rendered["default"], 0, tmp_path)  # listening on 0.0.0.0, the web API behind a token
    assert pod.web_api_token
    settings = replace(make_settings(), http_host=pod.http_host, web_api_token=pod.web_api_token,
                       web_allowed_hosts=pod.web_allowed_hosts)  # fmt: skip
    engine = ReplyEngine(tiny_model, open_store("memory://", max_turns=5), settings)
    await engine.start()
    client = TestClient(TestServer(build_app(engine, settings), host="127.0.0.1", port=0))
    await client.start_server()
    try:
        for name in ("startupProbe", "livenessProbe", "readinessProbe"):
            response = await client.get(container[name]["httpGet"]["path"], headers={"Host": "10.244.1.17:8080"})
            assert response.status == 200, (name, await response.text())
        monitor = kinds(rendered["autoscaling"], "ServiceMonitor")[0]
        response = await client.get(monitor["spec"]["endpoints"][0]["path"], headers={"Host": "10.244.1.17:8080"})
        assert response.status == 200 and b"blenderchat_" in await response.read()
    finally:
        await client.close()
        await engine.close(timeout=1)


@pytest.mark.parametrize("grace, pause", [(None, None), (30, 5), (0, 0)])
def test_the_grace_period_is_above_shutdown_grace(tmp_path, grace: int | None, pause: int | None) -> None:
    values: dict[str, Any] = {}
    if grace is not None:
        values = {"shutdownGraceSeconds": grace, "preStopSeconds": pause}
    objects = render(values)
    settings = pod_settings(objects, 0, tmp_path)
    pod = bot_workload(objects)["spec"]["template"]["spec"]
    pre_stop = bot_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # SIGTERM comes after the preStop pause; then the bot waits SHUTDOWN_GRACE for replies, then closes.
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + settings.shutdown_grace
    assert settings.shutdown_grace == (8 if grace is None else grace)


def test_rollouts_never_run_two_pods_on_one_sqlite_file_or_one_shard(rendered) -> None:
    assert bot_workload(rendered["default"])["spec"]["strategy"] == {"type": "Recreate"}
    assert bot_workload(rendered["slack-http"])["spec"]["strategy"] == {"type": "Recreate"}
    # On Redis the inbox's claims answer each message once while old and new pods overlap.
    assert bot_workload(rendered["autoscaling"])["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}
    }  # fmt: skip
    for shape in ("redis-discord", "in-chart-redis"):
        workload = bot_workload(rendered[shape])
        assert workload["kind"] == "StatefulSet" and workload["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    assert kinds(rendered["default"], "PersistentVolumeClaim")[0]["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize(
    "values, budget",
    [
        ({}, False),
        ({"replicas": 1, "redis": {"url": "redis://r:6379/0"}}, False),
        ({"replicas": 2, "redis": {"url": "redis://r:6379/0"}}, True),
        ({"redis": {"url": "redis://r:6379/0"}, "autoscaling": {"enabled": True, "minReplicas": 1}}, False),
        ({"redis": {"url": "redis://r:6379/0"}, "autoscaling": {"enabled": True, "minReplicas": 2}}, True),
    ],
)
def test_a_disruption_budget_exactly_when_more_than_one_replica(values, budget: bool) -> None:
    budgets = kinds(render(values), "PodDisruptionBudget")
    assert bool(budgets) == budget
    if budget:
        assert budgets[0]["spec"]["maxUnavailable"] == 1


def test_the_ci_shapes_have_budgets_where_they_have_replicas(rendered) -> None:
    assert {shape: bool(kinds(objects, "PodDisruptionBudget")) for shape, objects in rendered.items()} == {
        "default": False, "slack-http": False, "redis-discord": True, "autoscaling": True, "in-chart-redis": True,
    }  # fmt: skip


def test_the_autoscaler_scales_the_deployment_on_cpu(rendered) -> None:
    objects = rendered["autoscaling"]
    (hpa,) = kinds(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in bot_workload(objects)["spec"]  # the autoscaler owns it


# -- security -------------------------------------------------------------------


def dockerfile_uid() -> int:
    text = (REPO / "Dockerfile").read_text()
    uid = int(re.search(r"--uid (\d+)", text).group(1))
    assert re.search(rf"^USER {uid}:{uid}$", text, re.M)
    return uid


def test_pods_run_as_the_images_user_with_nothing_they_do_not_need(rendered) -> None:
    uid = dockerfile_uid()
    for shape, objects in rendered.items():
        pod = bot_workload(objects)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, shape
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == uid
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for container in pod["containers"] + pod["initContainers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, (shape, container["name"])
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}
            for mount in container["volumeMounts"]:
                source = volumes[mount["name"]]
                assert "emptyDir" in source or "persistentVolumeClaim" in source
                assert not mount.get("readOnly")
        assert {m["mountPath"] for m in bot_container(objects)["volumeMounts"]} == {"/data", "/tmp"}


def test_tokens_come_only_from_a_secret(rendered) -> None:
    given = {value for shape in CI_VALUES for value in ci_values(shape).get("secrets", {}).values() if value}
    given |= {value for secret in EXISTING_SECRETS.values() for value in secret.values()}
    for shape, objects in rendered.items():
        for config in kinds(objects, "ConfigMap"):
            assert not set(config["data"]) & SECRET_VARIABLES, shape
            assert not set(config["data"].values()) & given, shape
        for variable in bot_container(objects)["env"]:
            if variable["name"] in SECRET_VARIABLES:
                assert "secretKeyRef" in variable["valueFrom"], (shape, variable)
    created = named(rendered["redis-discord"], "Secret", FULLNAME)
    assert created["stringData"] == {"DISCORD_TOKEN": DISCORD_TOKEN}
    # An existing Secret: the chart creates none and reads the operator's by name.
    existing = rendered["autoscaling"]
    assert kinds(existing, "Secret") == []
    env = bot_container(existing)["env"]
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"]["name"] for v in env if "valueFrom" in v}
    assert refs == {
        "SLACK_BOT_TOKEN": "blender-chat-tokens", "SLACK_APP_TOKEN": "blender-chat-tokens",
        "WEB_API_TOKEN": "blender-chat-tokens", "MEMORY_URL": "blender-chat-redis",
    }  # fmt: skip


def test_network_policies(rendered) -> None:
    policies = {p["metadata"]["name"]: p for p in kinds(rendered["in-chart-redis"], "NetworkPolicy")}
    bot, redis = policies[FULLNAME], policies[f"{FULLNAME}-redis"]
    assert bot["spec"]["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}]
    egress_ports = sorted(port["port"] for rule in bot["spec"]["egress"] for port in rule["ports"])
    assert egress_ports == [53, 53, 443, 6379]
    allowed = redis["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed == bot["spec"]["podSelector"]["matchLabels"]
    assert kinds(rendered["default"], "NetworkPolicy") == []


def test_the_in_chart_redis_keeps_an_append_only_file(rendered) -> None:
    redis = named(rendered["in-chart-redis"], "StatefulSet", f"{FULLNAME}-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["redis-server", "--appendonly", "yes"]
    assert container["volumeMounts"] == [{"name": "redis-data", "mountPath": "/data"}]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "redis-data"
    assert redis["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# -- refusals -------------------------------------------------------------------

REDIS = {"url": "redis://redis:6379/0"}


@pytest.mark.parametrize(
    "values, message",
    [
        ({"replicas": 2}, "2 replicas on SQLite would lose data: SQLite is one file on one pod's volume"),
        ({"autoscaling": {"enabled": True}}, "6 replicas on SQLite would lose data"),
        ({"replicas": 3, "discord": {"enabled": True}, "secrets": {"discordToken": DISCORD_TOKEN}},
         "Discord shards on 3 pods need Redis (set redis.url or redis.inChart.enabled=true)"),
        ({"slack": {"mode": "http"}, "secrets": {"slackBotToken": "xoxb-1", "slackSigningSecret": "s"}},
         "slack.mode=http needs a way in for Slack's events: set ingress.enabled=true with ingress.host, "
         "or slack.publicUrl"),
        ({"redis": REDIS, "autoscaling": {"enabled": True}, "discord": {"enabled": True},
          "secrets": {"discordToken": DISCORD_TOKEN}},
         "autoscaling with Discord on: DISCORD_SHARD_COUNT is replicas x discord.shardsPerPod"),
        ({"discord": {"enabled": True}}, "secrets.discordToken is empty"),
        ({"redis": {"url": "redis://r:6379/0", "inChart": {"enabled": True}}},
         "redis.inChart.enabled and redis.url/redis.urlSecret both name a Redis: choose one"),
        ({"ingress": {"enabled": True}}, "ingress.enabled needs ingress.host"),
        ({"env": {"DISCORD_TOKEN": DISCORD_TOKEN}}, "env.DISCORD_TOKEN would put a credential in a ConfigMap"),
        ({"env": {"MEMORY_URL": "sqlite:////tmp/x.db"}}, "env.MEMORY_URL is set by the chart from its values"),
    ],
)
def test_refusals_fail_rendering_with_their_message(values, message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as error:
        render(values)
    assert f"blender-chat: {message}" in str(error.value)


def test_what_is_refused_on_sqlite_is_taken_on_redis(tmp_path) -> None:
    render({"replicas": 2, "redis": REDIS})
    render({"slack": {"mode": "http", "publicUrl": "https://bots.example.com/slack/events"},
            "secrets": {"slackBotToken": "xoxb-1", "slackSigningSecret": "s"}})  # fmt: skip
    assert "https://bots.example.com/slack/events" in notes(
        {"slack": {"mode": "http", "publicUrl": "https://bots.example.com/slack/events"},
         "secrets": {"slackBotToken": "xoxb-1", "slackSigningSecret": "s"}}
    )  # fmt: skip


@pytest.mark.parametrize(
    "values, where",
    [
        ({"replicas": 0}, "/replicas"),
        ({"replicas": "three"}, "/replicas"),
        ({"slack": {"mode": "webhook"}}, "/slack/mode"),
        ({"env": {"log_level": "DEBUG"}}, "log_level"),  # the settings' own names
        ({"redis": {"url": "postgres://db"}}, "/redis/url"),
        ({"model": {"source": "hub"}}, "/model/source"),
        ({"replica": 2}, "replica"),  # a misspelt key is not silently ignored
    ],
)
def test_the_schema_refuses_wrong_values_at_install(values, where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as error:
        render(values)
    assert where in str(error.value)


def test_notes_say_the_shape(rendered) -> None:
    assert "one pod on SQLite" in notes(ci_values("default"))
    sharded = notes(ci_values("redis-discord"))
    assert "3 replica(s) on Redis" in sharded and "pod i of 3 serves shards i*2 to i*2+1 of 6" in sharded
    assert "the old one stopped first" in sharded and "overlap" not in sharded
    assert "Rolling updates overlap old and new pods" in notes(ci_values("autoscaling"))
    assert "https://chat.example.com/slack/events" in notes(ci_values("slack-http"))


# -- README's install commands ----------------------------------------------------


def readme_install_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.startswith("helm install")]


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_readmes_install_commands_render() -> None:
    """Each `helm install` in README's Kubernetes section, its --set and -f read as helm would."""
    commands = readme_install_commands()
    assert len(commands) == 5
    shell = {"$WEB_API_TOKEN": "web-token", "$SLACK_BOT_TOKEN": "xoxb-1-readme", "$SLACK_SIGNING_SECRET": "secret"}
    for command in commands:
        words = command.split()
        assert words[:4] == ["helm", "install", "chat", "deploy/helm/blender-chat"]
        values: dict[str, Any] = {}
        for flag, argument in zip(words[4::2], words[5::2], strict=True):
            if flag == "-f":
                values = merged(values, yaml.safe_load((REPO / argument).read_text()))
                continue
            assert flag == "--set", command
            key, _, value = argument.partition("=")
            values = merged(values, helm.parse_set_string(f"{key}={shell.get(value, value)}"))
        assert bot_workload(render(values))["metadata"]["name"] == FULLNAME, command
