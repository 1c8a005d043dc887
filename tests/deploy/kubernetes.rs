//! deploy/kubernetes/: every YAML document parsed; workloads cross-checked against their
//! ConfigMap's pullgate config (ports, probes, cache, mounts, grace period); the config
//! checked by `pullgate check` with the pod's files and environment laid out in a temp dir;
//! and the probe paths asked of the real binary running that config on loopback.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use yaml_rust2::Yaml;

use crate::pod::{
    container_port, find, lay_out, list, load, only, pullgate_container, s, selects, Doc, Pod,
};
use crate::{
    drain_seconds, files_under, free_port, http_status, poll, pullgate_check, repo, show,
    size_bytes, warnings, Running, BIN, IMAGE_UID,
};

const NODE_MIRROR: &str = "deploy/kubernetes/node-mirror";
const PRIVATE_ENDPOINT: &str = "deploy/kubernetes/private-endpoint";

/// What every workload must get right whatever its shape.
fn check_workload(docs: &[Doc], workload: &Yaml, pod: &Pod) {
    let spec = &workload["spec"];
    let template = &spec["template"];
    let pod_spec = &template["spec"];
    assert!(
        selects(
            &spec["selector"]["matchLabels"],
            &template["metadata"]["labels"]
        ),
        "selector matches the pod template's labels"
    );
    let sa = s(&pod_spec["serviceAccountName"], "serviceAccountName");
    assert!(
        find(docs, "ServiceAccount", sa).is_some(),
        "ServiceAccount {sa}"
    );
    assert_eq!(
        pod_spec["automountServiceAccountToken"].as_bool(),
        Some(false)
    );
    let volume_names: Vec<&str> = list(&pod_spec["volumes"])
        .iter()
        .map(|v| s(&v["name"], "volume name"))
        .collect();
    for c in list(&pod_spec["containers"])
        .iter()
        .chain(list(&pod_spec["initContainers"]))
    {
        let name = s(&c["name"], "container name");
        assert_eq!(
            s(&c["image"], "image"),
            "pullgate",
            "{name}: the kustomize image name"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["capabilities"]["drop"][0].as_str(),
            Some("ALL"),
            "{name}"
        );
        for m in list(&c["volumeMounts"]) {
            let v = s(&m["name"], "mount name");
            assert!(
                volume_names.contains(&v),
                "{name}: mounts unknown volume {v}"
            );
        }
    }
    assert_eq!(
        pod_spec["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );

    let container = pullgate_container(pod_spec);
    let user = |key: &str| {
        container["securityContext"][key]
            .as_i64()
            .or_else(|| pod_spec["securityContext"][key].as_i64())
    };
    assert_eq!(user("runAsUser"), Some(IMAGE_UID), "the image's user");
    assert_eq!(
        container["securityContext"]["runAsNonRoot"]
            .as_bool()
            .or_else(|| pod_spec["securityContext"]["runAsNonRoot"].as_bool()),
        Some(true)
    );
    assert!(
        container["securityContext"]["capabilities"]["add"].is_badvalue(),
        "pullgate needs no capability"
    );

    // Every listener has a container port; the probes ask the admin listener for the two paths
    // pullgate answers.
    let ports: Vec<u16> = list(&container["ports"])
        .iter()
        .map(|p| container_port(container, &p["containerPort"]))
        .collect();
    for addr in pod.facts.listen.iter().chain([&pod.facts.admin]) {
        assert!(ports.contains(&addr.port()), "container port for {addr}");
    }
    let host_network = pod_spec["hostNetwork"].as_bool() == Some(true);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(
            container_port(container, &get["port"]),
            pod.facts.admin.port(),
            "{probe}"
        );
        let admin_ip = pod.facts.admin.ip();
        if admin_ip.is_loopback() {
            // The kubelet reaches a loopback admin listener only on the node's own network.
            assert!(
                host_network,
                "{probe}: admin_listen {admin_ip} needs hostNetwork"
            );
            assert_eq!(
                get["host"].as_str(),
                Some(admin_ip.to_string().as_str()),
                "{probe}"
            );
        } else {
            assert!(
                admin_ip.is_unspecified(),
                "admin_listen on the pod's address"
            );
            assert!(get["host"].is_badvalue(), "{probe}: the pod's own address");
        }
    }

    // The cache is a volume, bounded by cache.max_size (and an emptyDir's limit above it).
    let cache = pod
        .mounts
        .get(&pod.facts.cache_dir)
        .unwrap_or_else(|| panic!("cache.dir {} is not a volume mount", pod.facts.cache_dir));
    if let Some(limit) = cache["emptyDir"]["sizeLimit"].as_str() {
        assert!(
            size_bytes(limit) > pod.facts.max_size,
            "emptyDir sizeLimit {limit} must exceed cache.max_size or the pod is evicted"
        );
        let requested = container["resources"]["requests"]["ephemeral-storage"]
            .as_str()
            .map_or(0, size_bytes);
        assert!(
            requested >= size_bytes(limit),
            "requests.ephemeral-storage covers the cache's sizeLimit {limit}"
        );
    } else {
        assert_eq!(
            cache["hostPath"]["type"].as_str(),
            Some("DirectoryOrCreate")
        );
    }

    // SIGTERM to exit fits in the grace period, after any preStop pause.
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_i64()
        .unwrap_or(0);
    let grace = pod_spec["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    let needed = pre_stop + i64::try_from(drain_seconds()).expect("seconds") + 5;
    assert!(
        grace >= needed,
        "grace period {grace}s < preStop {pre_stop}s + drain + 5s"
    );
}

/// `pullgate check` with the pod's files and environment: accepted, and the only warning
/// allowed is an admin listener the kubelet can reach (`[admin-exposed]`).
fn check_config(pod: &Pod) {
    let loopback_admin = pod.facts.admin.ip().is_loopback();
    let out = pullgate_check(&pod.config, loopback_admin, &pod.env);
    assert!(out.status.success(), "{}", show(&out));
    for w in warnings(&out) {
        assert!(
            !loopback_admin
                && w.starts_with("server.admin_listen: ")
                && w.contains("admin-exposed"),
            "unexpected warning: {w}"
        );
    }
}

/// The pod's config, its listeners moved to free loopback ports, run by the real binary: the
/// probe paths answer 200 once it listens, and SIGTERM ends it within the drain.
fn probe_the_real_binary(pod: &Pod) {
    let mut text = pod.text.clone();
    let mut admin = None;
    for addr in pod.facts.listen.iter().chain([&pod.facts.admin]) {
        let moved: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        text = text.replace(&format!("\"{addr}\""), &format!("\"{moved}\""));
        if *addr == pod.facts.admin {
            admin = Some(moved);
        }
    }
    let admin = admin.expect("admin address");
    let config = pod.config.with_file_name("loopback.toml");
    std::fs::write(&config, text).expect("config");
    let mut running = Running::serve(&config, &pod.env);
    assert!(
        poll(Duration::from_secs(20), || http_status(admin, "/readyz")
            == Some(200)),
        "/readyz 200 on {admin}"
    );
    assert_eq!(http_status(admin, "/healthz"), Some(200));
    let took = running
        .terminate(Duration::from_secs(drain_seconds() + 10))
        .expect("pullgate exits after SIGTERM");
    assert!(
        took <= Duration::from_secs(drain_seconds() + 3),
        "exit took {took:?}"
    );
}

fn kustomization(dir: &str, docs: &[Doc]) {
    let k = docs
        .iter()
        .find(|d| d.file.ends_with("/kustomization.yaml"))
        .map(|d| &d.yaml)
        .expect("kustomization.yaml");
    assert_eq!(k["kind"].as_str(), Some("Kustomization"));
    let resources: Vec<&str> = list(&k["resources"])
        .iter()
        .map(|r| s(r, "resource"))
        .collect();
    for file in files_under(dir) {
        let name = file.rsplit('/').next().expect("file name");
        let listed = resources.contains(&name);
        if name == "kustomization.yaml" || name.ends_with("-example.yaml") {
            assert!(
                !listed,
                "{file}: not a resource (examples hold placeholders)"
            );
        } else {
            assert!(listed, "{file}: not in kustomization.yaml resources");
        }
    }
    let namespace = s(&k["namespace"], "namespace");
    assert!(
        find(docs, "Namespace", namespace).is_some(),
        "Namespace {namespace}"
    );
    let image = &k["images"][0];
    assert_eq!(image["name"].as_str(), Some("pullgate"));
    assert_eq!(
        image["newTag"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "the image tag is the crate's version"
    );
    // kubectl builds the kustomization when it is installed (not a Debian package).
    match Command::new("kubectl")
        .args(["kustomize"])
        .arg(repo(dir))
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            show(&out)
        ),
        Err(_) => eprintln!("kubectl not installed: kustomization checked by hand only"),
    }
}

#[test]
fn every_document_has_api_version_kind_name_and_labels() {
    for dir in [NODE_MIRROR, PRIVATE_ENDPOINT] {
        let docs = load(dir);
        assert!(docs.len() >= 5, "{dir}");
        for doc in docs
            .iter()
            .filter(|d| !d.file.ends_with("/kustomization.yaml"))
        {
            let what = &doc.file;
            assert!(
                !s(&doc.yaml["apiVersion"], what).is_empty(),
                "{what}: apiVersion"
            );
            assert!(!s(&doc.yaml["kind"], what).is_empty(), "{what}: kind");
            assert!(
                !s(&doc.yaml["metadata"]["name"], what).is_empty(),
                "{what}: name"
            );
            assert_eq!(
                doc.yaml["metadata"]["labels"]["app.kubernetes.io/name"].as_str(),
                Some("pullgate"),
                "{what}: label app.kubernetes.io/name"
            );
            assert!(
                doc.yaml["metadata"]["namespace"].is_badvalue(),
                "{what}: kustomize sets it"
            );
        }
        kustomization(dir, &docs);
    }
}

#[test]
fn node_mirror_daemonset_serves_the_node_loopback_and_installs_hosts_toml() {
    let docs = load(NODE_MIRROR);
    let ds = only(&docs, "DaemonSet");
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    let pod_spec = &ds["spec"]["template"]["spec"];
    assert_eq!(pod_spec["hostNetwork"].as_bool(), Some(true));
    assert_eq!(
        pod_spec["dnsPolicy"].as_str(),
        Some("Default"),
        "no cluster DNS needed"
    );
    let pod = lay_out(&docs, ds);
    check_workload(&docs, ds, &pod);
    for addr in &pod.facts.listen {
        assert!(addr.ip().is_loopback(), "{addr}: the node's loopback only");
    }

    // The init container writes containerd's hosts.toml for this mirror into the node's
    // /etc/containerd/certs.d, and hands the hostPath cache to the image's user.
    let init = &pod_spec["initContainers"][0];
    let script = s(&init["args"][0], "init script");
    let mount_of = |volume_path: &str| -> String {
        let volume = list(&pod_spec["volumes"])
            .iter()
            .find(|v| v["hostPath"]["path"].as_str() == Some(volume_path))
            .unwrap_or_else(|| panic!("a hostPath volume for {volume_path}"));
        list(&init["volumeMounts"])
            .iter()
            .find(|m| m["name"] == volume["name"])
            .map(|m| s(&m["mountPath"], "mountPath").to_owned())
            .unwrap_or_else(|| panic!("the init container mounts {volume_path}"))
    };
    let certs_d = mount_of("/etc/containerd/certs.d");
    let config_arg = list(&pullgate_container(pod_spec)["args"])[2].clone();
    let endpoint = format!("http://{}", pod.facts.listen[0]);
    for needed in [
        "client-config containerd".to_owned(),
        format!("-c {}", s(&config_arg, "config")),
        format!("--endpoint {endpoint}"),
        format!("--out {certs_d}"),
        format!(
            "chown {IMAGE_UID}:{IMAGE_UID} {}",
            mount_of(&pod.facts.cache_dir)
        ),
    ] {
        assert!(
            script
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .contains(&needed),
            "init script lacks `{needed}`:\n{script}"
        );
    }
    assert_eq!(
        init["securityContext"]["capabilities"]["add"][0].as_str(),
        Some("CHOWN")
    );

    check_config(&pod);
    client_config_writes_hosts_toml(&pod, &endpoint);
    probe_the_real_binary(&pod);
}

/// The init container's `pullgate client-config containerd` run by the real binary on the
/// pod's config: it succeeds and writes `_default` and the docker.io mirror pointing at the
/// pod's listener.
fn client_config_writes_hosts_toml(pod: &Pod, endpoint: &str) {
    let out_dir = pod.config.with_file_name("certs.d");
    let out = Command::new(BIN)
        .args(["client-config", "containerd", "-c"])
        .arg(&pod.config)
        .args(["--endpoint", endpoint, "--out"])
        .arg(&out_dir)
        .env_clear()
        .envs(pod.env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run pullgate client-config");
    assert!(out.status.success(), "{}", show(&out));
    for dir in ["_default", "docker.io"] {
        let hosts = std::fs::read_to_string(out_dir.join(dir).join("hosts.toml"))
            .unwrap_or_else(|e| panic!("{dir}/hosts.toml: {e}"));
        assert!(
            hosts.contains(&format!("[host.\"{endpoint}\"]")),
            "{dir}/hosts.toml does not name {endpoint}:\n{hosts}"
        );
    }
}

#[test]
fn private_endpoint_service_pdb_and_network_policy_agree_with_the_pods() {
    let docs = load(PRIVATE_ENDPOINT);
    let deploy = only(&docs, "Deployment");
    assert_eq!(deploy["apiVersion"].as_str(), Some("apps/v1"));
    let pod = lay_out(&docs, deploy);
    check_workload(&docs, deploy, &pod);
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    let pod_spec = &deploy["spec"]["template"]["spec"];
    let container = pullgate_container(pod_spec);
    let replicas = deploy["spec"]["replicas"].as_i64().expect("replicas");
    assert!(replicas >= 2, "more than one replica");

    // Clients reach the TLS listener through the Service, which keeps their address.
    let svc = find(&docs, "Service", "pullgate").expect("Service pullgate");
    assert!(
        selects(&svc["spec"]["selector"], labels),
        "Service selects the pods"
    );
    assert_eq!(svc["spec"]["externalTrafficPolicy"].as_str(), Some("Local"));
    for port in list(&svc["spec"]["ports"]) {
        let target = container_port(container, &port["targetPort"]);
        assert!(
            pod.facts.listen.iter().any(|a| a.port() == target),
            "Service targets a listener, not {target}"
        );
        assert_ne!(
            target,
            pod.facts.admin.port(),
            "the admin port stays out of the Service"
        );
    }
    let mut sources: Vec<String> = list(&svc["spec"]["loadBalancerSourceRanges"])
        .iter()
        .map(|r| s(r, "range").to_owned())
        .collect();
    sources.sort();
    assert_eq!(
        sources, pod.facts.zones,
        "load balancer ranges = the config's zones"
    );

    // The replicas are one cluster: the headless Service is cluster.peers_dns and targets the
    // plain listener, each pod advertises its own address, and the key is a Secret.
    let config = crate::parse_toml(&pod.text);
    let cluster = &config["cluster"];
    let (dns_name, dns_port) = cluster["peers_dns"]
        .as_str()
        .and_then(|d| d.rsplit_once(':'))
        .expect("cluster.peers_dns = \"name:port\"");
    let peers = find(&docs, "Service", "pullgate-peers").expect("Service pullgate-peers");
    let namespace = find(&docs, "Namespace", "pullgate").map(|_| "pullgate");
    assert_eq!(
        dns_name,
        format!(
            "pullgate-peers.{}.svc.cluster.local",
            namespace.expect("namespace")
        ),
        "peers_dns names the headless Service"
    );
    assert_eq!(
        peers["spec"]["clusterIP"].as_str(),
        Some("None"),
        "headless"
    );
    assert_eq!(
        peers["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true),
        "members before they are ready"
    );
    assert!(selects(&peers["spec"]["selector"], labels));
    let peer_port = list(&peers["spec"]["ports"])
        .iter()
        .map(|p| container_port(container, &p["targetPort"]))
        .next()
        .expect("a port");
    assert_eq!(peer_port.to_string(), dns_port, "the members' port");
    assert!(
        pod.facts
            .listen
            .iter()
            .any(|a| a.port() == peer_port && a.ip().is_unspecified()),
        "a plain listener on the pod's address for peers"
    );
    let advertise = cluster["advertise_env"].as_str().expect("advertise_env");
    assert!(
        list(&container["env"])
            .iter()
            .any(|e| e["name"].as_str() == Some(advertise)
                && e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("status.podIP")),
        "{advertise} from the downward API"
    );
    assert!(
        config["cache"]["l2"]["url"].as_str().is_some(),
        "the replicas share an object store"
    );

    let pdb = only(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"].as_str(), Some("policy/v1"));
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], labels));
    let min = pdb["spec"]["minAvailable"].as_i64().expect("minAvailable");
    assert!(
        (1..replicas).contains(&min),
        "a drain can proceed and one pod stays"
    );

    // The network policy admits exactly the config's zones to the registry port, only the
    // pullgate pods to the peer port, and names only ports the container has.
    let np = only(&docs, "NetworkPolicy");
    assert!(selects(&np["spec"]["podSelector"]["matchLabels"], labels));
    let mut registry_sources = Vec::new();
    for rule in list(&np["spec"]["ingress"]) {
        for port in list(&rule["ports"]) {
            let number = container_port(container, &port["port"]);
            if number == peer_port {
                let from = list(&rule["from"]);
                assert_eq!(from.len(), 1, "peers only");
                assert!(selects(&from[0]["podSelector"]["matchLabels"], labels));
                assert!(
                    from[0]["ipBlock"].is_badvalue() && from[0]["namespaceSelector"].is_badvalue()
                );
            } else if number != pod.facts.admin.port() {
                registry_sources.extend(
                    list(&rule["from"])
                        .iter()
                        .map(|f| s(&f["ipBlock"]["cidr"], "ipBlock.cidr").to_owned()),
                );
            }
        }
    }
    registry_sources.sort();
    assert_eq!(registry_sources, pod.facts.zones);

    // The secret examples hold placeholders only.
    for secret in docs
        .iter()
        .filter(|d| d.yaml["kind"].as_str() == Some("Secret"))
    {
        assert!(secret.file.ends_with("-example.yaml"), "{}", secret.file);
        for (_, value) in secret.yaml["stringData"].as_hash().expect("stringData") {
            assert!(
                s(value, "value").starts_with("REPLACE-"),
                "placeholder values only"
            );
        }
    }

    check_config(&pod);
    // Run on loopback, the members' name is one the hosts file answers: no DNS query leaves.
    let mut pod = pod;
    pod.text = pod.text.replace(dns_name, "localhost");
    probe_the_real_binary(&pod);
}
