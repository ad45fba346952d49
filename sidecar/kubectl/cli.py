"""`kubectl egress`: status, check, suggest and diff for workloads with the egress sidecar.

Installed as the console script `kubectl-egress`, which kubectl finds on PATH as a plugin.
Exit codes: 0 success (check: the call would go through), 1 check: denied / diff --exit-code:
a call that goes through today (allow or audit) would be denied, 2 an error (said on stderr).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sidecar import contract
from sidecar.destinations import SeenDestination
from sidecar.kubectl import local, plan
from sidecar.kubectl.cluster import (
    JSON,
    Cluster,
    PluginError,
    PodSummary,
    PodUnreachable,
    Workload,
)
from sidecar.kubectl.plan import UsageError, WorkloadRef
from sidecar.policy.engine import Policy, combine
from sidecar.policy.errors import AllowlistError
from sidecar.policy.model import IPNetwork, Mode
from sidecar.policy.parse import parse_allowlist
from sidecar.policy.store import apply_mode

if TYPE_CHECKING:
    from injector.mutate import Settings

PROG = "kubectl egress"
ERROR_EXIT = 2


# -- the workload's policy ------------------------------------------------------------------------


class NoAllowlistError(PluginError):
    """None of the workload's allowlist ConfigMaps exists (suggest then proposes a first one)."""


def _settings(workload: Workload) -> Settings:
    from injector.config import InjectorConfig
    from injector.mutate import read_settings

    return read_settings(workload.template_annotations, InjectorConfig())


def _configmap_refs(workload: Workload) -> list[tuple[str, str]]:
    refs = []
    for ref in _settings(workload).configmaps:
        ns, _, name = ref.rpartition("/")
        refs.append((ns or workload.namespace, name))
    return refs


def _load_policy(
    cluster: Cluster, workload: Workload
) -> tuple[Policy, Mode, dict[str, str | None], list[tuple[str, str]]]:
    """The union of the workload's ConfigMaps as its sidecars enforce it, its mode, and each
    ConfigMap's allowlist.yaml text (None when the ConfigMap is missing)."""
    refs = _configmap_refs(workload)
    policies: list[Policy] = []
    texts: dict[str, str | None] = {}
    for ns, name in refs:
        source = f"configmap:{ns}/{name}"
        obj = cluster.configmap(ns, name)
        if obj is None:
            texts[source] = None
            continue
        text = (obj.get("data") or {}).get(contract.ALLOWLIST_KEY)
        if not isinstance(text, str):
            raise PluginError(f"ConfigMap {ns}/{name} has no {contract.ALLOWLIST_KEY} key")
        texts[source] = text
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        try:
            policies.append(parse_allowlist(text, source=source, version=version))
        except AllowlistError as err:
            raise PluginError(
                f"ConfigMap {ns}/{name} holds an invalid allowlist (the sidecars keep "
                f"enforcing their last good version):\n{err}"
            ) from None
    missing_refs = [source for source, text in texts.items() if text is None]
    if policies and missing_refs:
        _warn(
            f"{', '.join(missing_refs)} does not exist: the other allowlists decide (a call "
            "only the missing one allowed is denied)"
        )
    if not policies:
        missing = ", ".join(f"{ns}/{name}" for ns, name in refs)
        raise NoAllowlistError(
            f"{workload.ref}'s allowlist ConfigMap {missing} does not exist: its sidecars deny "
            "every call until it does"
        )
    policy = policies[0] if len(policies) == 1 else combine(policies, source=",".join(texts))
    annotated = _settings(workload).mode
    mode = Mode(annotated) if annotated else (policy.meta.mode or Mode.ENFORCE)
    return policy, mode, texts, refs


@dataclass
class Seen:
    """What a workload's injected pods saw, merged."""

    destinations: list[SeenDestination]
    pods: int  # how many answered
    since: str | None  # the latest start among them: every pod saw what came after
    ranges: list[IPNetwork]  # where their guard steps aside (--allow-private-range)


def _seen(cluster: Cluster, workload: Workload) -> Seen:
    """What the workload's injected pods saw; a warning for each pod that could not be read and
    each whose summary was full (it evicted destinations: a proposal may miss them)."""
    pods = cluster.pods(workload)
    if not pods:
        raise PluginError(f"{workload.ref} in namespace {workload.namespace} has no pods")
    injected = [p for p in pods if _injection(cluster, workload, p)[0]]
    if not injected:
        _, why, _ = _injection(cluster, workload, pods[0])
        raise PluginError(
            f"pod not injected: no pod of {workload.ref} has the egress sidecar "
            f"({pods[0]['metadata']['name']}: {why})"
        )
    read: list[tuple[str, PodSummary, JSON]] = []
    failures: list[str] = []
    for pod in injected:
        name = pod["metadata"]["name"]
        try:
            summary = cluster.destinations(workload.namespace, name)
        except PodUnreachable as err:
            failures.append(f"{name}: {err}")
            continue
        read.append((name, summary, cluster.readiness(workload.namespace, name).body or {}))
    return _merged(str(workload.ref), read, failures)


def _seen_local(urls: Sequence[str]) -> Seen:
    """The same from sidecars read directly on their health port (--from-url)."""
    read: list[tuple[str, PodSummary, JSON]] = []
    failures: list[str] = []
    for url in urls:
        try:
            summary = local.destinations(url)
        except PodUnreachable as err:
            failures.append(str(err))
            continue
        read.append((url, summary, local.ready_body(url)))
    return _merged(", ".join(urls), read, failures)


def _merged(what: str, read: Sequence[tuple[str, PodSummary, JSON]], failures: list[str]) -> Seen:
    ranges: dict[IPNetwork, None] = {}
    starts: list[str] = []
    for name, summary, body in read:
        if summary.since:
            starts.append(summary.since)
        if summary.evicted:
            _warn(
                f"{name}'s summary was full and let {summary.evicted} least recently seen "
                "destinations go: what they were is not known here (the sidecar's "
                "--destinations-max-entries keeps more)"
            )
        for text in body.get("extra_private_ranges") or []:
            try:
                ranges[ipaddress.ip_network(str(text), strict=False)] = None
            except ValueError:
                _warn(f"{name}: its ready body names {text!r} as a private range; ignored")
    for failure in failures:
        _warn(f"skipped pod {failure}")
    if not read:
        raise PluginError(
            f"no sidecar of {what} answered {contract.DEBUG_DESTINATIONS_PATH}: "
            + "; ".join(failures)
        )
    return Seen(
        plan.merge_seen([summary.seen for _, summary, _ in read]),
        len(read),
        max(starts, default=None),
        list(ranges),
    )


def _injection(cluster: Cluster, workload: Workload, pod: JSON) -> tuple[bool, str, JSON]:
    """Injected or not, why, and the injector's status annotation (empty when not injected)."""
    from injector.config import InjectorConfig
    from injector.mutate import NotAPodError, PodContext, decide

    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    status_text = annotations.get(contract.ANNOTATION_STATUS)
    if status_text is not None:
        try:
            status = json.loads(status_text)
        except ValueError:
            status = {}
        return True, "injected", status if isinstance(status, dict) else {}
    ns = workload.namespace
    label = cluster.namespace_label(ns)
    ctx = PodContext(namespace=ns, namespace_injection=label)  # type: ignore[arg-type]
    try:
        would, why = decide(pod, ctx, InjectorConfig())
    except NotAPodError as err:
        return False, f"not a pod the injector can read: {err}", {}
    if would:
        why = (
            f"opted in ({why}) but has no sidecar: created before the opt-in or while the "
            f"webhook was down; kubectl rollout restart {workload.ref} -n {ns}"
        )
    return False, why, {}


# -- output ---------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _dump(value: Any, output: str) -> str:
    if output == "json":
        return json.dumps(value, indent=2) + "\n"
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True)


def _color(args: argparse.Namespace) -> bool:
    if args.color == "auto":
        return sys.stdout.isatty()
    return bool(args.color == "always")


# -- status ---------------------------------------------------------------------------------------


def _pod_row(cluster: Cluster, workload: Workload, pod: JSON) -> JSON:
    name = pod["metadata"]["name"]
    injected, why, status = _injection(cluster, workload, pod)
    row: JSON = {
        "namespace": workload.namespace,
        "workload": str(workload.ref),
        "pod": name,
        "injected": injected,
        "why": why,
        "capture": status.get("capture") if injected else None,
        "mode": None,
        "ready": None,
        "policy": [],
        "in_sync": None,
        "error": None,
    }
    if not injected:
        return row
    health = cluster.readiness(workload.namespace, name)
    if health.body is None:
        row["error"] = f"sidecar not reachable through the pod proxy: {health.error}"
        return row
    body = health.body
    row["ready"] = health.ready
    row["mode"] = body.get("mode")
    in_sync = True
    for src in body.get("sources") or []:
        source = str(src.get("source") or "")
        current: str | None = None
        if source.startswith("configmap:"):
            ns, _, cm_name = source.removeprefix("configmap:").rpartition("/")
            obj = cluster.configmap_cached(ns, cm_name)
            current = str((obj.get("metadata") or {}).get("resourceVersion")) if obj else "deleted"
            in_sync = in_sync and current == src.get("version")
            if current == src.get("rejected_version") and src.get("rejected_problem"):
                row["error"] = (
                    f"the pod rejected {source} version {current} and keeps enforcing "
                    f"{src.get('version')}: {src.get('rejected_problem')}"
                )
        row["policy"].append({"source": source, "in_pod": src.get("version"), "current": current})
    row["in_sync"] = in_sync if row["policy"] else None
    return row


def _yes_no(value: Any) -> str:
    return "-" if value is None else "yes" if value else "no"


def cmd_status(args: argparse.Namespace, cluster: Cluster) -> int:
    namespace = None if args.all_namespaces else cluster.namespace
    rows: list[JSON] = []
    for workload in cluster.workloads(namespace, _warn):
        pods = cluster.pods(workload)
        if not pods:
            rows.append(
                {
                    "namespace": workload.namespace,
                    "workload": str(workload.ref),
                    "pod": None,
                    "error": "no pods",
                }
            )
        rows.extend(_pod_row(cluster, workload, pod) for pod in pods)
    if args.output in ("json", "yaml"):
        sys.stdout.write(_dump({"items": rows}, args.output))
        return 0
    if not rows:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        print(f"No workloads found in {where}.", file=sys.stderr)
        return 0
    headers = ["WORKLOAD", "POD", "INJECTED", "CAPTURE", "MODE", "READY", "POLICY", "CURRENT"]
    headers.append("NOTE")
    table = []
    for r in rows:
        policy = r.get("policy") or []
        note = r.get("error") or ""
        if not note and r.get("injected") is False:
            note = r["why"]
        elif not note and r.get("in_sync") is False:
            note = "stale: the pod enforces an older version than the ConfigMap's"
        cells = [
            r["workload"],
            r["pod"] or "-",
            _yes_no(r.get("injected")),
            r.get("capture") or "-",
            r.get("mode") or "-",
            _yes_no(r.get("ready")),
            ",".join(str(p["in_pod"]) for p in policy) or "-",
            ",".join(str(p["current"] or "-") for p in policy) or "-",
            note,
        ]
        table.append([r["namespace"], *cells] if namespace is None else cells)
    sys.stdout.write(
        plan.render_table(["NAMESPACE", *headers] if namespace is None else headers, table)
    )
    return 0


# -- check ----------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, cluster: Cluster) -> int:
    from sidecar.commands.check import TargetError, inspected_destination, parse_target
    from sidecar.policy.model import Destination

    try:
        dest = parse_target(args.target, args.method)
        address = ipaddress.ip_address(args.address) if args.address else None
    except (TargetError, ValueError) as err:
        raise UsageError(str(err)) from None
    workload = cluster.workload(WorkloadRef.parse(args.workload))
    policy, mode, _, _ = _load_policy(cluster, workload)
    # A host a rule inspects (inspect: true): its HTTPS requests are decided, as in the sidecar.
    inspecting = policy.inspection(dest.host, dest.port) if dest.host is not None else None
    if inspecting is not None:
        dest = inspected_destination(dest, args.target, args.method)
    raw = policy.decide(
        Destination(dest.host, dest.port, address, dest.method, dest.path, dest.inspected)
    )
    decision = apply_mode(raw, mode)
    target = plan.hostport(dest.host or "-", dest.port)
    result = {
        "workload": str(workload.ref),
        "namespace": workload.namespace,
        "destination": target,
        "decision": decision.verdict.value,
        "reason": decision.reason.value,
        "rule": decision.rule,
        "detail": decision.detail,
        "inspected": inspecting is not None,
        "mode": mode.value,
        "policy_source": policy.meta.source,
        "policy_version": policy.meta.version,
    }
    if args.output in ("json", "yaml"):
        sys.stdout.write(_dump(result, args.output))
    elif args.output == "table":
        sys.stdout.write(
            plan.render_table(
                ["DESTINATION", "DECISION", "REASON", "RULE", "POLICY"],
                [
                    [
                        target,
                        decision.verdict.value,
                        decision.reason.value,
                        decision.rule or "-",
                        f"{policy.meta.source}@{policy.meta.version}",
                    ]
                ],
            )
        )
    else:
        print(f"{decision.verdict.value} {target} for {workload.ref} in {workload.namespace}")
        print(f"  reason: {decision.reason.value}")
        if decision.detail:
            print(f"  detail: {decision.detail}")
        print(f"  rule:   {decision.rule if decision.rule is not None else '-'}")
        print(f"  policy: {policy.meta.source} version {policy.meta.version} (mode {mode.value})")
    return 0 if decision.permits else 1


# -- suggest --------------------------------------------------------------------------------------


def cmd_suggest(args: argparse.Namespace, cluster: Cluster | None) -> int:
    policy: Policy | None
    if cluster is None:  # --from-url: sidecars read directly, the allowlist from a file
        observed = _seen_local(args.from_url)
        current = local.read_allowlist(args.allowlist_file, args.namespace)
        refs = [(current.namespace, current.name)]
        current_text = current.text
        try:
            policy = parse_allowlist(current_text, source="file") if current_text else None
        except AllowlistError as err:
            raise PluginError(f"{args.allowlist_file} is not a valid allowlist:\n{err}") from None
        subject, namespace, pods_word = args.workload, current.namespace, "sidecar"
    else:
        if args.allowlist_file:
            raise UsageError("--allowlist-file goes with --from-url (else the ConfigMap is read)")
        workload = cluster.workload(WorkloadRef.parse(args.workload))
        observed = _seen(cluster, workload)
        refs = _configmap_refs(workload)
        try:
            policy, _, texts, _ = _load_policy(cluster, workload)
        except NoAllowlistError:
            policy, texts = None, {}  # no allowlist yet: propose a first one
        current_text = texts.get(f"configmap:{refs[0][0]}/{refs[0][1]}")
        subject, namespace, pods_word = str(workload.ref), workload.namespace, "pod"
    seen, pods, ranges = observed.destinations, observed.pods, observed.ranges
    ns, name = refs[0]
    suggestion = plan.suggest(
        current_text,
        policy,
        seen,
        wildcards=args.wildcards,
        wildcard_min=args.wildcard_min,
        include_private=args.private,
        extra_ranges=ranges,
    )
    for warning in suggestion.warnings:
        _warn(warning)
    added = len(suggestion.added)
    calls = f"{len(seen)} destination{'s' if len(seen) != 1 else ''}"
    header = [
        f"Proposed by kubectl egress suggest {subject} -n {namespace}: {added} "
        f"rule{'s' if added != 1 else ''} added",
        f"from the {calls} its {pods} {pods_word}{'s' if pods != 1 else ''} saw"
        + (f" since {observed.since}," if observed.since else ","),
        "merged over "
        + (
            f"the current {ns}/{name}."
            if current_text is not None
            else f"nothing ({ns}/{name} does not exist)."
        ),
        "Review, then: kubectl apply -f THIS-FILE",
    ]
    if len(refs) > 1:
        others = ", ".join(f"{o_ns}/{o_name}" for o_ns, o_name in refs[1:])
        header.insert(3, f"The workload's other allowlists ({others}) stay as they are.")
    manifest = plan.configmap_manifest(name, ns, suggestion.document, header)
    if args.output == "table":
        sys.stdout.write(plan.suggestion_table(suggestion))
    elif args.output in ("json", "yaml"):
        sys.stdout.write(
            _dump(
                {
                    "configmap": yaml.safe_load(manifest),
                    "proposals": [p.to_json() for p in suggestion.proposals],
                    "skipped": [s.to_json() for s in suggestion.skipped],
                    "warnings": suggestion.warnings,
                },
                args.output,
            )
        )
    else:
        sys.stdout.write(manifest)
    return 0


# -- diff -----------------------------------------------------------------------------------------


def cmd_diff(args: argparse.Namespace, cluster: Cluster | None) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PluginError(f"cannot read {args.file}: {err}") from None
    try:
        new = parse_allowlist(text, source="stdin" if args.file == "-" else f"file:{args.file}")
    except AllowlistError as err:
        name = "stdin" if args.file == "-" else args.file
        raise PluginError(f"{name} is not a valid allowlist:\n{err}") from None
    if cluster is None:  # --from-url: no annotations to read, the document's mode decides
        observed = _seen_local(args.from_url)
        subject, annotated = args.workload, None
    else:
        workload = cluster.workload(WorkloadRef.parse(args.workload))
        observed = _seen(cluster, workload)
        subject, annotated = str(workload.ref), _settings(workload).mode
    seen, ranges = observed.destinations, observed.ranges
    mode = Mode(annotated) if annotated else (new.meta.mode or Mode.ENFORCE)
    changes = plan.diff(seen, new, ranges, mode)
    shown = changes if args.all else [c for c in changes if c.kind != plan.UNCHANGED]
    breaking = sum(1 for c in changes if c.kind in (plan.ALLOW_TO_DENY, plan.AUDIT_TO_DENY))
    if args.output in ("json", "yaml"):
        sys.stdout.write(_dump({"items": [c.to_json() for c in shown]}, args.output))
    elif shown:
        sys.stdout.write(plan.diff_table(shown, color=_color(args)))
    counts: dict[str, int] = {}
    for c in changes:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "nothing seen yet"
    print(f"{len(changes)} destinations seen by {subject}: {summary}", file=sys.stderr)
    return 1 if args.exit_code and breaking else 0


# -- parser ---------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("cluster")
    group.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)",
    )
    group.add_argument("--context", help="kubeconfig context (default: the current one)")
    group.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    return common


def _local_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from-url",
        action="append",
        metavar="URL",
        help="no cluster: read this sidecar's health port directly (e.g. http://127.0.0.1:15021, "
        "or a kubectl port-forward of a pod's 15021); repeat for several. KIND/NAME only names "
        "the workload in the output",
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Egress control for workloads with the egress-sidecar: what is injected and in "
            "force, what a workload's policy decides, an allowlist from what its pods really "
            "called, and what an edit would change.\n\n"
            "Reads each sidecar's health port (:15021) through the API server's pod proxy: "
            "needs RBAC get on pods/proxy, list on pods and apps workloads, get on configmaps.\n\n"
            "exit codes: 0 ok; 1 check: denied, diff --exit-code: a call that goes through "
            "today would be blocked; 2 an error (said on stderr)"
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = sub.add_parser(
        "status",
        parents=[common],
        help="workloads and pods: injected or not and why, capture, mode, policy version",
        description="List the Deployments, StatefulSets and DaemonSets of a namespace (or all, "
        "-A) and their pods: injected or not and why, capture mode, enforce/audit, readiness, "
        "the policy version each pod enforces (read through the pod proxy) and the "
        "ConfigMaps' current version.",
    )
    status.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    status.add_argument(
        "-o", "--output", choices=["table", "json", "yaml"], default="table", help="(default table)"
    )
    status.set_defaults(func=cmd_status)

    check = sub.add_parser(
        "check",
        parents=[common],
        help="the decision for one destination under a workload's policy",
        description="Decide URL or HOST[:PORT] against the workload's allowlist ConfigMaps (its "
        "egress-sidecar.io/allowlist annotation, default egress-allowlist) and mode, as its "
        "sidecars would, by name (--address: as if it resolved there). An http:// URL is "
        "decided like a plain-HTTP request, https:// or HOST[:PORT] like a CONNECT. Exit 0 "
        "when the call would go through (allow or audit), 1 when denied.",
    )
    check.add_argument("workload", metavar="KIND/NAME", help="e.g. deploy/web")
    check.add_argument("target", metavar="URL|HOST[:PORT]")
    check.add_argument("--method", "-X", help="HTTP method for http:// URLs (default GET)")
    check.add_argument("--address", metavar="IP", help="decide as if the host resolved to IP")
    check.add_argument(
        "-o",
        "--output",
        choices=["text", "table", "json", "yaml"],
        default="text",
        help="(default text: decision, reason, detail, rule, policy)",
    )
    check.set_defaults(func=cmd_check)

    suggest = sub.add_parser(
        "suggest",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="an allowlist ConfigMap that allows what the workload's pods called",
        description="Read what the workload's sidecars decided since they started "
        f"({contract.DEBUG_DESTINATIONS_PATH}, through the pod proxy) and print its allowlist\n"
        "ConfigMap with a rule added for every destination that was not allowed, merged over\n"
        "the current one, each rule commented with its call count and last seen time.\n"
        "Private addresses are left out (commented) unless --private; either way a warning\n"
        "says so. Many subdomains of one domain become one wildcard only with --wildcards.\n\n"
        "example:\n"
        "  kubectl egress suggest deploy/web -n shop > allowlist.yaml\n"
        "  kubectl egress diff deploy/web -n shop -f allowlist.yaml\n"
        "  kubectl apply -f allowlist.yaml",
    )
    suggest.add_argument("workload", metavar="KIND/NAME", help="e.g. deploy/web")
    suggest.add_argument(
        "--wildcards",
        action="store_true",
        help="propose *.DOMAIN for --wildcard-min or more subdomains of one registrable domain",
    )
    suggest.add_argument(
        "--wildcard-min",
        type=int,
        default=plan.DEFAULT_WILDCARD_MIN,
        metavar="N",
        help="subdomains that make a wildcard (default %(default)s)",
    )
    suggest.add_argument(
        "--private",
        action="store_true",
        help="add private destinations too (as cidr rules, which lift the private-address "
        "guard for that address)",
    )
    suggest.add_argument(
        "-o",
        "--output",
        choices=["manifest", "table", "json", "yaml"],
        default="manifest",
        help="manifest: the ConfigMap (default); table/json/yaml: the proposed rules",
    )
    _local_options(suggest)
    suggest.add_argument(
        "--allowlist-file",
        metavar="FILE",
        help="with --from-url: the current allowlist (a ConfigMap manifest or a bare allowlist) "
        "to merge over; none: a first one is proposed",
    )
    suggest.set_defaults(func=cmd_suggest)

    diff = sub.add_parser(
        "diff",
        parents=[common],
        help="which recently seen destinations a new allowlist would decide differently",
        description="Decide every destination the workload's pods recently called under a new "
        "allowlist (a ConfigMap manifest or a bare allowlist; - for stdin) and list those whose "
        "decision would change, those that would stop going through first (allow→deny, "
        "audit→deny: red on a terminal). Before is what the pod decided, after the new "
        "document's decision in the workload's mode (its annotation, else the document's "
        "mode:, else enforce), with the address the pod connected to. Paths are "
        "never kept, so a plain-HTTP call that a rule with paths decides is listed as "
        "'depends on path'.",
    )
    diff.add_argument("workload", metavar="KIND/NAME", help="e.g. deploy/web")
    diff.add_argument(
        "-f",
        "--filename",
        dest="file",
        required=True,
        metavar="FILE",
        help="the new allowlist: a ConfigMap manifest or a bare allowlist; - reads stdin",
    )
    diff.add_argument("--all", action="store_true", help="list unchanged destinations too")
    diff.add_argument(
        "--exit-code",
        action="store_true",
        help="exit 1 when a call that goes through today (allow or audit) would be denied",
    )
    diff.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="colour the rows (auto: when stdout is a terminal)",
    )
    diff.add_argument(
        "-o", "--output", choices=["table", "json", "yaml"], default="table", help="(default table)"
    )
    _local_options(diff)
    diff.set_defaults(func=cmd_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        local_mode = bool(getattr(args, "from_url", None))
        cluster = None if local_mode else Cluster(args.kubeconfig, args.context, args.namespace)
        code: int = args.func(args, cluster)
    except (PluginError, UsageError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return ERROR_EXIT
    return code


if __name__ == "__main__":
    sys.exit(main())
