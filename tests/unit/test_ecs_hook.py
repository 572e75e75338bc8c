"""What the ECS hook asks ECS for, what it makes of the answers, and how it reports ECS's errors.

The boto client is a fake that answers from a script and can be told to fail; nothing reaches AWS.
"""

from __future__ import annotations

import copy
from typing import Any

import botocore.session
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from omnisphere_release.hooks.ecs import (
    IN_FLIGHT,
    REGISTERABLE,
    RUN_TAG,
    EcsDeploymentError,
    EcsDeploymentHook,
    EcsNotOnTarget,
    LiveRevision,
    ReturnStep,
    deployment_configuration,
    image_of,
    pinned_image,
    summarize,
    with_image,
)

CLUSTER, SERVICE = "omnisphere", "auth-service"
DEPLOYMENT_ARN = "arn:aws:ecs:eu-west-1:123456789012:service-deployment/omnisphere/auth-service/abc123"
FAMILY_ARN = "arn:aws:ecs:eu-west-1:123456789012:task-definition/auth-service"
ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
DIGEST = "sha256:" + "ab" * 32


class FakeEcsClient:
    """Answers ECS calls from a script and records them.

    An answer is a response dict, an exception to raise, an iterator of those (one per call), or a function of the
    call's arguments. A call the test did not script fails with KeyError.
    """

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)

        def call(**kwargs: Any) -> Any:
            self.calls.append((method, copy.deepcopy(kwargs)))
            answer = self.answers[method]
            if hasattr(answer, "__next__"):
                answer = next(answer)
            elif callable(answer) and not isinstance(answer, Exception):
                answer = answer(**kwargs)
            if isinstance(answer, Exception):
                raise answer
            return answer

        return call

    def called(self, method: str) -> list[dict[str, Any]]:
        return [kwargs for name, kwargs in self.calls if name == method]


def client_error(code: str, message: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


# --- deployment_configuration -----------------------------------------------------------------------------------


def test_rolling_deployments_roll_back_on_the_circuit_breaker():
    assert deployment_configuration("rolling", 5) == {
        "strategy": "ROLLING", "maximumPercent": 200, "minimumHealthyPercent": 100,
        "deploymentCircuitBreaker": {"enable": True, "rollback": True}}


@pytest.mark.parametrize(("bake_minutes", "whole_minutes"), [(0, 0), (-3, 0), (0.1, 1), (2.0, 2), (2.01, 3), (10, 10)])
def test_blue_green_bake_time_is_rounded_up_to_whole_minutes(bake_minutes, whole_minutes):
    assert deployment_configuration("blue_green", bake_minutes) == {"strategy": "BLUE_GREEN",
                                                                    "bakeTimeInMinutes": whole_minutes}


@pytest.mark.parametrize(("bake_minutes", "bake", "canary_bake"), [(10, 10, 5), (4.5, 5, 2), (1, 1, 1), (0, 0, 1)])
def test_canary_sends_a_tenth_of_traffic_for_half_the_bake(bake_minutes, bake, canary_bake):
    assert deployment_configuration("canary", bake_minutes) == {
        "strategy": "CANARY", "bakeTimeInMinutes": bake,
        "canaryConfiguration": {"canaryPercent": 10.0, "canaryBakeTimeInMinutes": canary_bake}}


@pytest.mark.parametrize(("bake_minutes", "bake", "step_bake"), [(12, 12, 3), (9.2, 10, 2), (3, 3, 1), (0, 0, 1)])
def test_linear_shifts_a_quarter_of_traffic_per_step(bake_minutes, bake, step_bake):
    assert deployment_configuration("linear", bake_minutes) == {
        "strategy": "LINEAR", "bakeTimeInMinutes": bake,
        "linearConfiguration": {"stepPercent": 25.0, "stepBakeTimeInMinutes": step_bake}}


@pytest.mark.parametrize("strategy", ["rolling", "blue_green", "canary", "linear"])
def test_deployment_configuration_uses_only_fields_ecs_knows(strategy):
    # botocore's model of UpdateService, read from the installed package: a misspelt field fails here, not in AWS.
    model = botocore.session.get_session().get_service_model("ecs").shape_for("DeploymentConfiguration")
    configuration = deployment_configuration(strategy, 10)

    assert set(configuration) <= set(model.members)
    for field, value in configuration.items():
        if isinstance(value, dict):
            assert set(value) <= set(model.members[field].members), field


@pytest.mark.parametrize("strategy", ["blue-green", "ROLLING", ""])
def test_an_unknown_strategy_is_refused_by_name(strategy):
    with pytest.raises(ValueError, match=f"unknown strategy '{strategy}'; use rolling, blue_green, canary or linear"):
        deployment_configuration(strategy, 5)


# --- images -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "expected"), [
    (f"{ECR}/omnisphere/auth-service:1.4.0", f"{ECR}/omnisphere/auth-service:1.5.0"),
    (f"{ECR}/omnisphere/auth-service@{DIGEST}", f"{ECR}/omnisphere/auth-service:1.5.0"),
    (f"{ECR}/omnisphere/auth-service:1.4.0@{DIGEST}", f"{ECR}/omnisphere/auth-service:1.5.0"),
    ("localhost:5000/auth:1.4.0", "localhost:5000/auth:1.5.0"),
    ("localhost:5000/auth", "localhost:5000/auth:1.5.0"),
    ("localhost:5000/team/auth@" + DIGEST, "localhost:5000/team/auth:1.5.0"),
    ("nginx:1.27", "nginx:1.5.0"),
    ("nginx", "nginx:1.5.0"),
])
def test_with_image_replaces_the_tag(image, expected):
    assert with_image(image, "1.5.0") == expected


OTHER_DIGEST = "sha256:" + "cd" * 32


@pytest.mark.parametrize(("image", "expected"), [
    (f"{ECR}/omnisphere/auth-service:1.4.0", f"{ECR}/omnisphere/auth-service@{DIGEST}"),
    (f"{ECR}/omnisphere/auth-service", f"{ECR}/omnisphere/auth-service@{DIGEST}"),
    (f"{ECR}/omnisphere/auth-service@{OTHER_DIGEST}", f"{ECR}/omnisphere/auth-service@{DIGEST}"),
    (f"{ECR}/omnisphere/auth-service:1.4.0@{OTHER_DIGEST}", f"{ECR}/omnisphere/auth-service@{DIGEST}"),
    ("localhost:5000/team/auth:1.4.0", f"localhost:5000/team/auth@{DIGEST}"),
])
def test_pinned_image_names_the_repository_by_digest_without_the_tag(image, expected):
    # <repository>@<digest>: the form ECS documents; a tag beside the digest would only mislead a reader.
    assert pinned_image(image, DIGEST) == expected


@pytest.mark.parametrize("digest", [None, ""])
def test_pinned_image_without_a_digest_keeps_the_tag(digest):
    assert pinned_image("nginx:1.27", digest) == "nginx:1.27"


@pytest.mark.parametrize("digest", ["ab" * 32, "sha256:" + "ab" * 31, "sha512:" + "ab" * 64, DIGEST + "\n",
                                    "sha256:" + "AB" * 32])
def test_pinned_image_refuses_what_is_not_an_ecr_digest_naming_it(digest):
    with pytest.raises(ValueError, match="expected sha256: and 64 hex digits") as raised:
        pinned_image(f"{ECR}/omnisphere/auth-service:1.4.0", digest)
    assert repr(digest) in str(raised.value)


TASK_DEFINITION: dict[str, Any] = {
    "taskDefinitionArn": f"{FAMILY_ARN}:7",
    "family": "auth-service",
    "revision": 7,
    "status": "ACTIVE",
    "registeredAt": "2025-01-01T00:00:00Z",
    "registeredBy": "arn:aws:iam::123456789012:role/deployer",
    "compatibilities": ["EC2", "FARGATE"],
    "requiresAttributes": [{"name": "com.amazonaws.ecs.capability.docker-remote-api.1.18"}],
    "networkMode": "awsvpc",
    "executionRoleArn": "arn:aws:iam::123456789012:role/ecs-execution",
    "requiresCompatibilities": ["FARGATE"],
    "cpu": "256",
    "memory": "512",
    "volumes": [],
    "placementConstraints": [],
    "containerDefinitions": [
        {"name": "envoy", "image": "public.ecr.aws/appmesh/aws-appmesh-envoy:v1.29", "essential": True},
        {"name": "auth", "image": f"{ECR}/omnisphere/auth-service:1.4.0", "essential": True,
         "portMappings": [{"containerPort": 8080}], "environment": [{"name": "LOG_LEVEL", "value": "info"}]},
    ],
    "tags": [{"key": "team", "value": "identity"}, {"key": RUN_TAG, "value": "release__2025-01-01T00:00:00"}],
}


def test_image_of_finds_the_named_container():
    assert image_of(TASK_DEFINITION, "auth") == f"{ECR}/omnisphere/auth-service:1.4.0"
    assert image_of(TASK_DEFINITION, "envoy") == "public.ecr.aws/appmesh/aws-appmesh-envoy:v1.29"


def test_image_of_a_missing_container_names_it_and_the_catalog_field():
    with pytest.raises(EcsDeploymentError) as raised:
        image_of(TASK_DEFINITION, "auth-service")

    message = str(raised.value)
    assert f"{FAMILY_ARN}:7" in message
    assert "no container 'auth-service'" in message
    assert "ecs.container in the catalog" in message


def test_summarize_gives_stage_tasks_and_traffic():
    line = summarize({"status": "IN_PROGRESS", "lifecycleStage": "BAKE_TIME", "statusReason": "baking",
                      "targetServiceRevision": {"runningTaskCount": 2, "requestedTaskCount": 3,
                                                "requestedProductionTrafficWeight": 100.0}})

    assert line == "IN_PROGRESS at BAKE_TIME: 2/3 new tasks running, 100.0% of traffic; baking"


@pytest.mark.parametrize("target", [{}, None])
def test_summarize_survives_a_deployment_without_a_target_revision(target):
    line = summarize({"status": "PENDING", "targetServiceRevision": target})

    assert line == "PENDING at ?: ?/? new tasks running, ?% of traffic; "


# --- EcsDeploymentHook: services and errors ---------------------------------------------------------------------


def test_describe_service_skips_inactive_services():
    client = FakeEcsClient(describe_services={"services": [
        {"serviceName": SERVICE, "status": "INACTIVE", "taskDefinition": f"{FAMILY_ARN}:3"},
        {"serviceName": SERVICE, "status": "ACTIVE", "taskDefinition": f"{FAMILY_ARN}:7"},
    ]})

    service = EcsDeploymentHook(client=client).describe_service(CLUSTER, SERVICE)

    assert service["taskDefinition"] == f"{FAMILY_ARN}:7"
    assert client.calls == [("describe_services", {"cluster": CLUSTER, "services": [SERVICE]})]


@pytest.mark.parametrize("response", [
    {"services": [{"serviceName": SERVICE, "status": "INACTIVE"}]},
    {"services": [], "failures": [{"arn": SERVICE, "reason": "MISSING"}]},
])
def test_describe_service_names_cluster_and_service_when_there_is_none(response):
    hook = EcsDeploymentHook(client=FakeEcsClient(describe_services=response))

    with pytest.raises(EcsDeploymentError, match=f"ECS service {SERVICE} not found in cluster {CLUSTER}; "
                                                 "check the catalog's ecs.cluster and ecs.service"):
        hook.describe_service(CLUSTER, SERVICE)


def test_a_client_error_becomes_an_ecs_deployment_error_naming_the_service():
    error = client_error("ClusterNotFoundException", "Cluster not found.", "DescribeServices")
    hook = EcsDeploymentHook(client=FakeEcsClient(describe_services=error))

    with pytest.raises(EcsDeploymentError) as raised:
        hook.describe_service(CLUSTER, SERVICE)

    message = str(raised.value)
    assert message.startswith(f"describe service {CLUSTER}/{SERVICE}: ")
    assert "ClusterNotFoundException" in message
    assert "Cluster not found." in message


def test_a_connection_error_becomes_an_ecs_deployment_error():
    error = EndpointConnectionError(endpoint_url="https://ecs.eu-west-1.amazonaws.com/")
    hook = EcsDeploymentHook(client=FakeEcsClient(stop_service_deployment=error))

    with pytest.raises(EcsDeploymentError, match=f"stop deployment {DEPLOYMENT_ARN} with ROLLBACK: .*ecs.eu-west-1"):
        hook.stop_with_rollback(DEPLOYMENT_ARN)


def test_stop_with_rollback_asks_for_a_rollback():
    client = FakeEcsClient(stop_service_deployment={"serviceDeploymentArn": DEPLOYMENT_ARN})

    EcsDeploymentHook(client=client).stop_with_rollback(DEPLOYMENT_ARN)

    assert client.calls == [("stop_service_deployment", {"serviceDeploymentArn": DEPLOYMENT_ARN,
                                                         "stopType": "ROLLBACK"})]


# --- EcsDeploymentHook: revisions -------------------------------------------------------------------------------


def registering_client() -> FakeEcsClient:
    return FakeEcsClient(register_task_definition={"taskDefinition": {"taskDefinitionArn": f"{FAMILY_ARN}:8"}})


def test_register_revision_changes_only_the_image_of_the_named_container():
    client = registering_client()
    current = copy.deepcopy(TASK_DEFINITION)

    arn = EcsDeploymentHook(client=client).register_revision(current, "auth", f"{ECR}/omnisphere/auth-service:1.5.0",
                                                             "release__2025-02-01T00:00:00")

    assert arn == f"{FAMILY_ARN}:8"
    [registered] = client.called("register_task_definition")
    envoy, auth = registered["containerDefinitions"]
    assert envoy == TASK_DEFINITION["containerDefinitions"][0]
    assert auth == {**TASK_DEFINITION["containerDefinitions"][1], "image": f"{ECR}/omnisphere/auth-service:1.5.0"}
    # Only what RegisterTaskDefinition accepts; the read-only fields (ARN, revision, status, ...) and empty lists
    # are left out.
    assert set(registered) == {"family", "networkMode", "executionRoleArn", "requiresCompatibilities", "cpu",
                               "memory", "containerDefinitions", "tags"}
    assert {key: registered[key] for key in ("family", "networkMode", "executionRoleArn", "cpu", "memory")} == {
        key: TASK_DEFINITION[key] for key in ("family", "networkMode", "executionRoleArn", "cpu", "memory")}
    assert current == TASK_DEFINITION  # the caller's copy is not changed


def test_register_revision_replaces_the_run_tag_and_keeps_the_others():
    client = registering_client()

    EcsDeploymentHook(client=client).register_revision(TASK_DEFINITION, "auth", "auth:1.5.0", "release__new")

    [registered] = client.called("register_task_definition")
    assert registered["tags"] == [{"key": "team", "value": "identity"}, {"key": RUN_TAG, "value": "release__new"}]


def test_register_revision_tags_a_revision_that_had_no_tags():
    client = registering_client()
    untagged = {key: value for key, value in TASK_DEFINITION.items() if key != "tags"}

    EcsDeploymentHook(client=client).register_revision(untagged, "auth", "auth:1.5.0", "release__new")

    assert client.called("register_task_definition")[0]["tags"] == [{"key": RUN_TAG, "value": "release__new"}]


def test_register_revision_refuses_a_missing_container_before_registering():
    client = registering_client()

    with pytest.raises(EcsDeploymentError, match="no container 'api'"):
        EcsDeploymentHook(client=client).register_revision(TASK_DEFINITION, "api", "auth:1.5.0", "release__new")

    assert client.calls == []


def test_register_revision_copies_every_field_ecs_would_take_back():
    model = botocore.session.get_session().get_service_model("ecs")
    described = set(model.shape_for("TaskDefinition").members)
    registerable = set(model.operation_model("RegisterTaskDefinition").input_shape.members) - {"tags"}

    assert set(REGISTERABLE) <= registerable  # nothing RegisterTaskDefinition would reject
    # A release changes the image and nothing else: every field ECS would take back is copied (a field ECS adds
    # later fails this test, instead of being dropped silently by every release).
    assert (described & registerable) - set(REGISTERABLE) == set()


def describing(tags_by_arn: dict[str, list[dict[str, str]]]):
    def describe_task_definition(**kwargs: Any) -> dict[str, Any]:
        assert kwargs["include"] == ["TAGS"]  # without it ECS returns no tags and no revision would ever match
        arn = kwargs["taskDefinition"]
        return {"taskDefinition": {"taskDefinitionArn": arn, "family": "auth-service"}, "tags": tags_by_arn[arn]}

    return describe_task_definition


def test_find_revision_of_run_returns_the_revision_tagged_with_the_run():
    client = FakeEcsClient(
        list_task_definitions={"taskDefinitionArns": [f"{FAMILY_ARN}:9", f"{FAMILY_ARN}:8", f"{FAMILY_ARN}:7"]},
        describe_task_definition=describing({
            f"{FAMILY_ARN}:9": [{"key": RUN_TAG, "value": "release__other"}],
            f"{FAMILY_ARN}:8": [{"key": "team", "value": "identity"}, {"key": RUN_TAG, "value": "release__this"}],
            f"{FAMILY_ARN}:7": [{"key": RUN_TAG, "value": "release__this"}],
        }))

    found = EcsDeploymentHook(client=client).find_revision_of_run("auth-service", "release__this", look_back=5)

    assert found == f"{FAMILY_ARN}:8"  # the newest of the run's revisions
    assert client.called("list_task_definitions") == [{"familyPrefix": "auth-service", "sort": "DESC",
                                                       "maxResults": 5}]


def test_find_revision_of_run_returns_none_when_no_revision_carries_the_run():
    client = FakeEcsClient(
        list_task_definitions={"taskDefinitionArns": [f"{FAMILY_ARN}:9", f"{FAMILY_ARN}:8"]},
        describe_task_definition=describing({
            f"{FAMILY_ARN}:9": [{"key": RUN_TAG, "value": "release__other"}],
            f"{FAMILY_ARN}:8": [{"key": "release__this", "value": RUN_TAG}],
        }))

    assert EcsDeploymentHook(client=client).find_revision_of_run("auth-service", "release__this") is None
    assert len(client.called("describe_task_definition")) == 2


def test_find_revision_of_run_returns_none_for_a_new_family():
    client = FakeEcsClient(list_task_definitions={"taskDefinitionArns": []})

    assert EcsDeploymentHook(client=client).find_revision_of_run("auth-service", "release__this") is None


# --- EcsDeploymentHook: deployments -----------------------------------------------------------------------------

CONFIGURATION = deployment_configuration("canary", 10)


def test_update_service_returns_the_deployment_it_started():
    client = FakeEcsClient(update_service={"service": {"currentServiceDeployment": DEPLOYMENT_ARN}})

    arn = EcsDeploymentHook(client=client).update_service(CLUSTER, SERVICE, f"{FAMILY_ARN}:8", CONFIGURATION)

    assert arn == DEPLOYMENT_ARN
    assert client.calls == [("update_service", {"cluster": CLUSTER, "service": SERVICE,
                                                "taskDefinition": f"{FAMILY_ARN}:8",
                                                "deploymentConfiguration": CONFIGURATION})]


def test_update_service_falls_back_to_the_latest_deployment():
    client = FakeEcsClient(update_service={"service": {"serviceName": SERVICE}},
                           list_service_deployments={"serviceDeployments": [{"serviceDeploymentArn": DEPLOYMENT_ARN}]})

    arn = EcsDeploymentHook(client=client).update_service(CLUSTER, SERVICE, f"{FAMILY_ARN}:8", CONFIGURATION)

    assert arn == DEPLOYMENT_ARN
    assert client.called("list_service_deployments") == [{"cluster": CLUSTER, "service": SERVICE, "maxResults": 1}]


def test_update_service_without_any_deployment_names_the_service():
    client = FakeEcsClient(update_service={"service": {}}, list_service_deployments={"serviceDeployments": []})

    with pytest.raises(EcsDeploymentError, match=f"ECS service {CLUSTER}/{SERVICE} has no service deployment"):
        EcsDeploymentHook(client=client).update_service(CLUSTER, SERVICE, f"{FAMILY_ARN}:8", CONFIGURATION)


def test_update_service_error_names_the_service():
    error = client_error("InvalidParameterException", "Unknown strategy.", "UpdateService")
    hook = EcsDeploymentHook(client=FakeEcsClient(update_service=error))

    with pytest.raises(EcsDeploymentError, match=f"update service {CLUSTER}/{SERVICE}: .*InvalidParameterException"):
        hook.update_service(CLUSTER, SERVICE, f"{FAMILY_ARN}:8", CONFIGURATION)


def deployment(status: str) -> dict[str, Any]:
    return {"serviceDeploymentArn": DEPLOYMENT_ARN, "status": status, "lifecycleStage": "SCALE_UP"}


def test_describe_deployment_of_an_unknown_arn_says_why():
    failures = [{"arn": DEPLOYMENT_ARN, "reason": "MISSING"}]
    hook = EcsDeploymentHook(client=FakeEcsClient(
        describe_service_deployments={"serviceDeployments": [], "failures": failures}))

    with pytest.raises(EcsDeploymentError, match=f"service deployment {DEPLOYMENT_ARN} not found: .*MISSING"):
        hook.describe_deployment(DEPLOYMENT_ARN)


# --- EcsDeploymentHook.live_revision ----------------------------------------------------------------------------


def test_live_revision_is_the_service_its_task_definition_and_the_containers_image():
    client = FakeEcsClient(
        describe_services={"services": [{"serviceName": SERVICE, "status": "ACTIVE",
                                         "taskDefinition": f"{FAMILY_ARN}:7"}]},
        describe_task_definition={"taskDefinition": copy.deepcopy(TASK_DEFINITION), "tags": [{"key": "team",
                                                                                             "value": "identity"}]})

    live = EcsDeploymentHook(client=client).live_revision(CLUSTER, SERVICE, "auth")

    assert isinstance(live, LiveRevision)
    assert live.arn == f"{FAMILY_ARN}:7"
    assert live.image == f"{ECR}/omnisphere/auth-service:1.4.0"  # the named container's, not the envoy sidecar's
    assert live.task_definition["tags"] == [{"key": "team", "value": "identity"}]
    assert client.calls == [
        ("describe_services", {"cluster": CLUSTER, "services": [SERVICE]}),
        ("describe_task_definition", {"taskDefinition": f"{FAMILY_ARN}:7", "include": ["TAGS"]}),
    ]


def test_live_revision_of_a_service_without_the_catalogs_container_names_the_catalog_field():
    client = FakeEcsClient(
        describe_services={"services": [{"serviceName": SERVICE, "status": "ACTIVE",
                                         "taskDefinition": f"{FAMILY_ARN}:7"}]},
        describe_task_definition={"taskDefinition": copy.deepcopy(TASK_DEFINITION)})

    with pytest.raises(EcsDeploymentError, match="no container 'api'; check ecs.container in the catalog"):
        EcsDeploymentHook(client=client).live_revision(CLUSTER, SERVICE, "api")


# --- EcsDeploymentHook.return_to: the one way back ----------------------------------------------------------------
#
# Revisions of the auth-service family: the release went from PREVIOUS to RELEASED; OLDER is what a manual rollback
# may ask for. ECS's targetServiceRevision.arn is a service revision ARN (not a task definition), as in AWS.

OLDER, PREVIOUS, RELEASED = f"{FAMILY_ARN}:6", f"{FAMILY_ARN}:7", f"{FAMILY_ARN}:8"
REDEPLOY_ARN = "arn:aws:ecs:eu-west-1:123456789012:service-deployment/omnisphere/auth-service/def456"
SERVICE_REVISION = "arn:aws:ecs:eu-west-1:123456789012:service-revision/omnisphere/auth-service/4567"


def service_on(task_definition: str, current_deployment: str | None = DEPLOYMENT_ARN) -> dict[str, Any]:
    service = {"serviceName": SERVICE, "status": "ACTIVE", "taskDefinition": task_definition}
    if current_deployment:
        service["currentServiceDeployment"] = current_deployment
    return {"services": [service]}


def services_on(*task_definitions: str) -> Any:
    """describe_services answers, one per call: the service on each of ``task_definitions`` in turn."""
    return iter(service_on(td) for td in task_definitions)


def going_through(statuses_by_arn: dict[str, list[str]]) -> Any:
    """describe_service_deployments answers: each deployment goes through its statuses, one per describe (a describe
    beyond the script fails the test with IndexError)."""
    remaining = {arn: list(statuses) for arn, statuses in statuses_by_arn.items()}

    def describe_service_deployments(**kwargs: Any) -> dict[str, Any]:
        [arn] = kwargs["serviceDeploymentArns"]
        status = remaining[arn].pop(0)
        return {"serviceDeployments": [{
            "serviceDeploymentArn": arn, "status": status, "lifecycleStage": "SCALE_UP",
            "statusReason": f"deployment is {status}",
            "targetServiceRevision": {"arn": SERVICE_REVISION, "runningTaskCount": 2, "requestedTaskCount": 2}}]}

    return describe_service_deployments


def return_to(client: FakeEcsClient, task_definition: str = PREVIOUS) -> tuple[str, dict[str, Any] | None]:
    """Walk the way back as rollback_ecs does: a step, then (where the trigger would wait, deferred) describe the
    deployment it names until it leaves flight, then the next step, until a step has nothing to wait for.

    Return the actions joined as the operator reports them, and the last deployment waited for.
    """
    hook = EcsDeploymentHook(client=client)
    actions: list[str] = []
    settled = None
    for _ in range(5):
        step = hook.return_to(CLUSTER, SERVICE, task_definition,
                              redeployed=any(a.startswith("redeployed") for a in actions))
        assert isinstance(step, ReturnStep)
        if step.action:
            actions.append(step.action)
        if step.wait_for is None:
            return " and ".join(actions) or "none", settled
        while (settled := hook.describe_deployment(step.wait_for))["status"] in IN_FLIGHT:
            pass
    raise AssertionError("the way back took more than 5 steps")


def call_names(client: FakeEcsClient) -> list[str]:
    return [name for name, _ in client.calls]


@pytest.mark.parametrize("current_deployment", [DEPLOYMENT_ARN, None])
def test_return_to_does_nothing_when_the_service_already_runs_the_target(current_deployment):
    client = FakeEcsClient(describe_services=lambda **_: service_on(PREVIOUS, current_deployment),
                           describe_service_deployments=lambda **_: {"serviceDeployments": [deployment("SUCCESSFUL")]})

    first, second = return_to(client), return_to(client)

    assert first == second == ("none", None)  # nothing to do, nothing waited for
    # Running it twice changes nothing: only reads, never an update or a stop.
    assert set(call_names(client)) <= {"describe_services", "describe_service_deployments"}
    assert client.called("describe_service_deployments") == (
        [{"serviceDeploymentArns": [DEPLOYMENT_ARN]}] * 2 if current_deployment else [])


def test_a_step_back_never_waits_it_names_the_deployment_to_wait_for():
    client = FakeEcsClient(
        describe_services=services_on(RELEASED),
        describe_service_deployments=going_through({DEPLOYMENT_ARN: ["IN_PROGRESS"]}),
        stop_service_deployment={"serviceDeploymentArn": DEPLOYMENT_ARN})

    step = EcsDeploymentHook(client=client).return_to(CLUSTER, SERVICE, PREVIOUS)

    assert step == ReturnStep("stopped in-flight deployment with ROLLBACK", DEPLOYMENT_ARN)
    assert call_names(client) == ["describe_services", "describe_service_deployments", "stop_service_deployment"]


def test_return_to_stops_an_in_flight_deployment_with_rollback_and_waits_for_it():
    client = FakeEcsClient(
        describe_services=services_on(RELEASED, PREVIOUS),
        describe_service_deployments=going_through(
            {DEPLOYMENT_ARN: ["IN_PROGRESS", "ROLLBACK_REQUESTED", "ROLLBACK_IN_PROGRESS", "ROLLBACK_SUCCESSFUL",
                              "ROLLBACK_SUCCESSFUL"]}),
        stop_service_deployment={"serviceDeploymentArn": DEPLOYMENT_ARN})

    action, settled = return_to(client)

    assert action == "stopped in-flight deployment with ROLLBACK"
    assert settled is not None and settled["status"] == "ROLLBACK_SUCCESSFUL"
    assert client.called("stop_service_deployment") == [{"serviceDeploymentArn": DEPLOYMENT_ARN,
                                                         "stopType": "ROLLBACK"}]
    # Stop, wait until ECS has settled, look again: ECS runs the target, so no second deployment.
    assert call_names(client) == ["describe_services", "describe_service_deployments", "stop_service_deployment",
                                  "describe_service_deployments", "describe_service_deployments",
                                  "describe_service_deployments", "describe_services",
                                  "describe_service_deployments"]
    assert client.called("update_service") == []


def test_return_to_redeploys_the_target_over_a_completed_deployment_and_waits():
    client = FakeEcsClient(
        describe_services=iter([service_on(RELEASED), service_on(PREVIOUS, REDEPLOY_ARN)]),
        describe_service_deployments=going_through({DEPLOYMENT_ARN: ["SUCCESSFUL"],
                                                    REDEPLOY_ARN: ["PENDING", "IN_PROGRESS", "SUCCESSFUL",
                                                                   "SUCCESSFUL"]}),
        update_service={"service": {"currentServiceDeployment": REDEPLOY_ARN}})

    action, settled = return_to(client)

    assert action == f"redeployed {PREVIOUS}"
    assert settled is not None and settled["serviceDeploymentArn"] == REDEPLOY_ARN
    assert settled["status"] == "SUCCESSFUL"
    assert client.called("update_service") == [{
        "cluster": CLUSTER, "service": SERVICE, "taskDefinition": PREVIOUS,
        "deploymentConfiguration": {"strategy": "ROLLING", "maximumPercent": 200, "minimumHealthyPercent": 100,
                                    "deploymentCircuitBreaker": {"enable": True, "rollback": True}}}]
    assert client.called("stop_service_deployment") == []  # a completed deployment cannot be stopped
    # It waited for the deployment it started, until it left flight, then looked at the service again.
    assert client.called("describe_service_deployments")[1:] == [{"serviceDeploymentArns": [REDEPLOY_ARN]}] * 4


@pytest.mark.parametrize("rolling_back", ["ROLLBACK_REQUESTED", "ROLLBACK_IN_PROGRESS"])
def test_return_to_waits_for_a_rollback_in_flight_without_stopping_it_again(rolling_back):
    # The circuit breaker (or an earlier try of rollback_ecs) already sent the service back.
    client = FakeEcsClient(
        describe_services=services_on(PREVIOUS, PREVIOUS),
        describe_service_deployments=going_through(
            {DEPLOYMENT_ARN: [rolling_back, "ROLLBACK_IN_PROGRESS", "ROLLBACK_SUCCESSFUL", "ROLLBACK_SUCCESSFUL"]}))

    action, settled = return_to(client)

    assert action == "none"
    assert settled is not None and settled["status"] == "ROLLBACK_SUCCESSFUL"
    assert client.called("stop_service_deployment") == []
    assert client.called("update_service") == []
    assert len(client.called("describe_service_deployments")) == 4  # it waited until the rollback was over


def test_return_to_an_older_revision_stops_the_release_then_redeploys_the_older_revision():
    # A manual rollback to OLDER while a release from PREVIOUS to RELEASED is in flight: ECS's ROLLBACK brings the
    # service back to PREVIOUS, which is not what was asked for.
    client = FakeEcsClient(
        describe_services=iter([service_on(RELEASED), service_on(PREVIOUS), service_on(OLDER, REDEPLOY_ARN)]),
        describe_service_deployments=going_through({DEPLOYMENT_ARN: ["IN_PROGRESS", "ROLLBACK_SUCCESSFUL",
                                                                     "ROLLBACK_SUCCESSFUL"],
                                                    REDEPLOY_ARN: ["IN_PROGRESS", "SUCCESSFUL", "SUCCESSFUL"]}),
        stop_service_deployment={"serviceDeploymentArn": DEPLOYMENT_ARN},
        update_service={"service": {"currentServiceDeployment": REDEPLOY_ARN}})

    action, settled = return_to(client, OLDER)

    assert action == f"stopped in-flight deployment with ROLLBACK and redeployed {OLDER}"
    assert settled is not None and settled["serviceDeploymentArn"] == REDEPLOY_ARN
    assert [kwargs["taskDefinition"] for kwargs in client.called("update_service")] == [OLDER]
    assert call_names(client).index("stop_service_deployment") < call_names(client).index("update_service")


def test_return_to_raises_not_on_target_naming_both_revisions_when_ecs_ends_elsewhere():
    # The redeploy of PREVIOUS fails (its tasks do not start) and the circuit breaker sends the service back.
    client = FakeEcsClient(
        describe_services=iter([service_on(RELEASED), service_on(RELEASED, REDEPLOY_ARN)]),
        describe_service_deployments=going_through({DEPLOYMENT_ARN: ["SUCCESSFUL"],
                                                    REDEPLOY_ARN: ["IN_PROGRESS", "ROLLBACK_SUCCESSFUL",
                                                                   "ROLLBACK_SUCCESSFUL"]}),
        update_service={"service": {"currentServiceDeployment": REDEPLOY_ARN}})

    with pytest.raises(EcsNotOnTarget) as raised:
        return_to(client)

    assert isinstance(raised.value, EcsDeploymentError)  # rollback_<service> and rollback_ecs catch the family
    message = str(raised.value)
    assert message.startswith(f"ECS service {CLUSTER}/{SERVICE} ended on {RELEASED}, not {PREVIOUS} (")
    assert "ROLLBACK_SUCCESSFUL" in message  # the deployment it waited for, summarised
    assert len(client.called("update_service")) == 1  # one redeploy, never a second


def test_return_to_reports_an_aws_error_as_a_deployment_error_not_as_not_on_target():
    error = client_error("ThrottlingException", "Rate exceeded", "DescribeServices")
    client = FakeEcsClient(describe_services=error)

    with pytest.raises(EcsDeploymentError) as raised:
        return_to(client)

    # Not EcsNotOnTarget: an AWS error says nothing about where the service is, so the rollback may be retried.
    assert not isinstance(raised.value, EcsNotOnTarget)
    assert str(raised.value).startswith(f"describe service {CLUSTER}/{SERVICE}: ")
    assert "ThrottlingException" in str(raised.value)
    assert client.called("update_service") == []


def test_return_to_does_not_redeploy_on_top_of_a_rollback_ecs_has_not_finished():
    client = FakeEcsClient(
        describe_services=lambda **_: service_on(RELEASED),
        describe_service_deployments=lambda **_: {"serviceDeployments": [deployment("ROLLBACK_IN_PROGRESS")]})

    step = EcsDeploymentHook(client=client).return_to(CLUSTER, SERVICE, PREVIOUS)

    assert step == ReturnStep(None, DEPLOYMENT_ARN)  # wait for it; the next step looks again
    assert client.called("update_service") == []
    assert client.called("stop_service_deployment") == []


def test_return_to_does_not_stop_a_deployment_already_going_to_the_target():
    # A retry of a rollback whose first try raised while waiting on its own redeploy: stopping that deployment with
    # ROLLBACK would send ECS back to the revision it came from, the bad one. (On real ECS targetServiceRevision is
    # a service revision ARN: the task definition the deployment goes to is the service's own.)
    client = FakeEcsClient(
        describe_services=lambda **_: service_on(PREVIOUS, DEPLOYMENT_ARN),
        describe_service_deployments=going_through({DEPLOYMENT_ARN: ["IN_PROGRESS", "SUCCESSFUL", "SUCCESSFUL"]}),
        stop_service_deployment={"serviceDeploymentArn": DEPLOYMENT_ARN})

    action, settled = return_to(client)

    assert client.called("stop_service_deployment") == []
    assert client.called("update_service") == []
    assert action == "none" and settled is not None and settled["status"] == "SUCCESSFUL"


# --- traffic steps (canary and linear) ---------------------------------------------------------------------------
from omnisphere_release.hooks.ecs import (  # noqa: E402 - grouped with the tests of these rules
    lifecycle_hooks,
    parse_steps,
    steps_of,
    steps_problem,
    target_group_dimension,
    traffic_hook_prefix,
)


def steps(*pairs: tuple[float, float]) -> list[dict[str, Any]]:
    return [{"percent": percent, "bake_minutes": bake} for percent, bake in pairs]


def test_a_canary_in_two_steps_is_ecs_canary_with_the_first_steps_share_and_bake():
    configuration = deployment_configuration("canary", 99, steps((10, 4), (100, 2.5)))
    assert configuration == {"strategy": "CANARY", "bakeTimeInMinutes": 3,
                             "canaryConfiguration": {"canaryPercent": 10.0, "canaryBakeTimeInMinutes": 4}}
    assert steps_of(configuration) == [{"percent": 10.0, "bake_minutes": 4.0}, {"percent": 100.0, "bake_minutes": 3.0}]


def test_equal_linear_steps_are_ecs_linear():
    configuration = deployment_configuration("linear", 99, steps((25, 3), (50, 3), (75, 3), (100, 6)))
    assert configuration == {"strategy": "LINEAR", "bakeTimeInMinutes": 6,
                             "linearConfiguration": {"stepPercent": 25.0, "stepBakeTimeInMinutes": 3}}
    assert [s["percent"] for s in steps_of(configuration)] == [25.0, 50.0, 75.0, 100.0]
    assert [s["bake_minutes"] for s in steps_of(configuration)] == [3.0, 3.0, 3.0, 6.0]


@pytest.mark.parametrize(("strategy", "given", "problem"), [
    ("canary", steps((10, 2), (50, 2), (100, 5)), "a canary has two steps, [p, 100]"),
    ("linear", steps((10, 2), (50, 2), (100, 5)), "every step must add 10 %"),
    ("linear", steps((50, 2), (100, 5), (100, 5)), "must rise strictly"),
    ("linear", steps((25, 2), (50, 3), (75, 2), (100, 5)), "equal bakes"),
    ("canary", steps((10, 2), (90, 2)), "end at 100"),
    ("canary", steps((0, 2), (100, 2)), "from at least 1"),
    ("canary", steps((10, -1), (100, 2)), "must each be 0 to 1440 minutes"),
    ("canary", [{"percent": 10}], "each step needs a whole percent and bake_minutes"),
    ("blue_green", steps((10, 2), (100, 2)), "steps are for canary and linear deployments, not blue_green"),
])
def test_steps_ecs_cannot_run_are_refused_saying_why(strategy, given, problem):
    assert problem in (steps_problem(strategy, given) or "")
    if strategy != "blue_green":
        with pytest.raises(ValueError, match=problem.split("[")[0]):
            deployment_configuration(strategy, 5, given)


def test_without_steps_canary_and_linear_keep_their_fixed_shapes_and_rolling_and_blue_green_have_no_steps():
    assert deployment_configuration("canary", 10, ()) == deployment_configuration("canary", 10)
    assert steps_of(deployment_configuration("rolling", 5)) == []
    assert steps_of(deployment_configuration("blue_green", 5)) == []


@pytest.mark.parametrize(("value", "expected"), [
    (None, []), ("", []), ("None", []), ("[]", []),
    ('[{"percent": 10, "bake_minutes": 2}, {"percent": 100, "bake_minutes": 5}]', steps((10, 2), (100, 5))),
    (steps((50, 1), (100, 1)), steps((50, 1), (100, 1))),
])
def test_a_runs_steps_param_is_read_from_a_list_or_its_json(value, expected):
    assert parse_steps(value) == expected


@pytest.mark.parametrize("value", ["10,50,100", '{"percent": 10}', "[1, 2]"])
def test_a_runs_steps_param_that_is_no_list_of_steps_is_refused_naming_the_param(value):
    with pytest.raises(ValueError, match=r"^the run's steps: .* give a list like \[\{\"percent\""):
        parse_steps(value, "the run's steps")


def test_target_groups_are_read_as_cloudwatch_dimensions_and_the_test_traffic_hook_from_the_service():
    arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/auth-service/943f017f100becff"
    assert target_group_dimension(arn) == "targetgroup/auth-service/943f017f100becff"
    hook = {"hookTargetArn": "arn:aws:lambda:eu-west-1:123456789012:function:omnisphere-release-hook",
            "lifecycleStages": ["POST_TEST_TRAFFIC_SHIFT"], "hookDetails": {"statusParameterPrefix": "/omni/hooks/"}}
    other = {"hookTargetArn": "arn:aws:lambda:eu-west-1:123456789012:function:theirs",
             "lifecycleStages": ["POST_SCALE_UP"]}
    live = {"deploymentConfiguration": {"lifecycleHooks": [other, hook]}}
    assert lifecycle_hooks(live) == [other, hook]
    assert traffic_hook_prefix(lifecycle_hooks(live)) == "/omni/hooks"
    assert traffic_hook_prefix([other]) is None
    assert lifecycle_hooks({}) == []


def test_a_service_is_deploying_while_one_of_its_deployments_is_in_progress():
    # preflight refuses to start from it, and an approved plan no longer holds (the service is changing)
    def live(*states: str) -> LiveRevision:
        return LiveRevision({"taskDefinition": "arn:td/a:1", "deployments": [{"rolloutState": s} for s in states]},
                            {}, "img")

    assert live("COMPLETED", "IN_PROGRESS").deploying
    assert not live("COMPLETED").deploying and not live("FAILED").deploying and not live().deploying
