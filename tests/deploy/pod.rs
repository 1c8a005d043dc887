//! Reading Kubernetes manifests, and laying a workload's pod out on disk the way the kubelet
//! would, so that its pullgate config can be checked and run with the files the pod really has.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

use crate::{files_under, parse_toml, read, repo, show, size_bytes, BIN};

/// One YAML document and the file it came from.
pub struct Doc {
    pub file: String,
    pub yaml: Yaml,
}

/// Every document of every `.yaml` file in `dir`, multi-document files included.
pub fn load(dir: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    for file in files_under(dir) {
        assert!(file.ends_with(".yaml"), "{file}: only .yaml files in {dir}");
        let parsed = YamlLoader::load_from_str(&read(&repo(&file)))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        for yaml in parsed.into_iter().filter(|d| !d.is_null()) {
            docs.push(Doc {
                file: file.clone(),
                yaml,
            });
        }
    }
    docs
}

pub fn s<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: want a string, got {y:?}"))
}

pub fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

pub fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Option<&'a Yaml> {
    docs.iter()
        .map(|d| &d.yaml)
        .find(|y| y["kind"].as_str() == Some(kind) && y["metadata"]["name"].as_str() == Some(name))
}

pub fn only<'a>(docs: &'a [Doc], kind: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs
        .iter()
        .map(|d| &d.yaml)
        .filter(|y| y["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// `labels` (a mapping) contains every pair of `selector` (a mapping), which is not empty.
pub fn selects(selector: &Yaml, labels: &Yaml) -> bool {
    let Some(selector) = selector.as_hash() else {
        return false;
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels[s(k, "label")] == *v)
}

/// The `[server]`/`[cache]` facts of a pullgate config that manifests must agree with.
pub struct Facts {
    pub listen: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub cache_dir: String,
    pub max_size: u64,
    pub zones: Vec<String>,
}

pub fn facts(config: &toml::Value) -> Facts {
    let addr = |v: &toml::Value| -> SocketAddr {
        v.as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("address {v}"))
    };
    let server = &config["server"];
    let mut listen: Vec<SocketAddr> = server
        .get("listen")
        .and_then(toml::Value::as_array)
        .map(|a| a.iter().map(addr).collect())
        .unwrap_or_default();
    for tls in server
        .get("tls")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
    {
        listen.push(addr(&tls["listen"]));
    }
    let mut zones: Vec<String> = config
        .get("zones")
        .and_then(toml::Value::as_table)
        .into_iter()
        .flat_map(|t| t.values())
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .map(|v| v.as_str().expect("CIDR").to_owned())
        .collect();
    zones.sort();
    Facts {
        listen,
        admin: addr(&server["admin_listen"]),
        cache_dir: config["cache"]["dir"]
            .as_str()
            .expect("cache.dir")
            .to_owned(),
        max_size: size_bytes(
            config["cache"]["max_size"]
                .as_str()
                .expect("cache.max_size"),
        ),
        zones,
    }
}

/// The container port a probe or Service names (by name or number).
pub fn container_port(container: &Yaml, port: &Yaml) -> u16 {
    let number = match port {
        Yaml::Integer(n) => *n,
        Yaml::String(name) => list(&container["ports"])
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("no container port named {name}")),
        other => panic!("port {other:?}"),
    };
    u16::try_from(number).expect("port number")
}

/// A workload's pod laid out on disk as the kubelet would: each volume of the pullgate
/// container under a temp dir at its mount path, the config rewritten to point there.
pub struct Pod {
    _root: tempfile::TempDir,
    /// The config file inside the temp dir.
    pub config: PathBuf,
    /// The config text with paths pointing into the temp dir (addresses unchanged).
    pub text: String,
    /// The container's environment, Secret references resolved.
    pub env: Vec<(String, String)>,
    pub facts: Facts,
    /// Mount path -> volume (YAML) of the pullgate container.
    pub mounts: BTreeMap<String, Yaml>,
}

/// The pullgate container of a pod spec: the one whose args start with `serve`.
pub fn pullgate_container(pod: &Yaml) -> &Yaml {
    list(&pod["containers"])
        .iter()
        .find(|c| list(&c["args"]).first().and_then(Yaml::as_str) == Some("serve"))
        .expect("a container running `pullgate serve`")
}

/// Lays out the pullgate container of `workload` (a Deployment or DaemonSet); panics naming
/// what the manifests lack (a volume, a ConfigMap or Secret, a file outside every mount).
pub fn lay_out(docs: &[Doc], workload: &Yaml) -> Pod {
    let pod = &workload["spec"]["template"]["spec"];
    let container = pullgate_container(pod);
    let args: Vec<&str> = list(&container["args"])
        .iter()
        .map(|a| s(a, "arg"))
        .collect();
    assert_eq!(args.len(), 3, "serve -c <file>: {args:?}");
    assert_eq!(args[1], "-c");
    let config_path = args[2];

    let volumes: BTreeMap<&str, &Yaml> = list(&pod["volumes"])
        .iter()
        .map(|v| (s(&v["name"], "volume name"), v))
        .collect();
    let root = tempfile::tempdir().expect("tempdir");
    let inside = |mount: &str| root.path().join(mount.trim_start_matches('/'));
    let mut mounts = BTreeMap::new();
    let mut tls_dirs = Vec::new();
    for mount in list(&container["volumeMounts"]) {
        let name = s(&mount["name"], "volumeMounts.name");
        let path = s(&mount["mountPath"], "mountPath");
        let volume = volumes
            .get(name)
            .unwrap_or_else(|| panic!("volumeMount {name}: no such volume"));
        let dir = inside(path);
        std::fs::create_dir_all(&dir).expect("mount dir");
        let items = |source: &Yaml, data: &Yaml| -> Vec<(String, String)> {
            let all: Vec<(String, String)> = data
                .as_hash()
                .into_iter()
                .flatten()
                .map(|(k, v)| (s(k, "key").to_owned(), s(v, "value").to_owned()))
                .collect();
            if source["items"].is_badvalue() {
                return all;
            }
            list(&source["items"])
                .iter()
                .map(|item| {
                    let key = s(&item["key"], "items.key");
                    let value = all
                        .iter()
                        .find(|(k, _)| k == key)
                        .unwrap_or_else(|| panic!("items: no key {key}"))
                        .1
                        .clone();
                    (s(&item["path"], "items.path").to_owned(), value)
                })
                .collect()
        };
        let (config_map, secret) = (&volume["configMap"], &volume["secret"]);
        let files = if config_map.is_hash() {
            let cm = find(docs, "ConfigMap", s(&config_map["name"], "configMap.name"))
                .unwrap_or_else(|| panic!("volume {name}: its ConfigMap is not in the manifests"));
            items(config_map, &cm["data"])
        } else if secret.is_hash() {
            let secret_name = s(&secret["secretName"], "secretName");
            match find(docs, "Secret", secret_name) {
                Some(found) => items(secret, &found["stringData"]),
                None => {
                    // Made by the operator (kubectl create secret tls, or cert-manager): the
                    // README must say how, and the test makes a certificate in its place.
                    let readme = read(&repo("README.md"));
                    assert!(
                        readme.contains(&format!("create secret tls {secret_name}")),
                        "volume {name}: secret {secret_name} is neither in the manifests nor \
                         made by a `kubectl create secret tls {secret_name}` in README.md"
                    );
                    tls_dirs.push(dir.clone());
                    Vec::new()
                }
            }
        } else {
            assert!(
                !volume["emptyDir"].is_badvalue() || !volume["hostPath"].is_badvalue(),
                "volume {name}: configMap, secret, emptyDir or hostPath"
            );
            Vec::new()
        };
        for (file, content) in files {
            std::fs::write(dir.join(file), content).expect("volume file");
        }
        mounts.insert(path.to_owned(), (*volume).clone());
    }

    let env: Vec<(String, String)> = list(&container["env"])
        .iter()
        .map(|e| {
            let name = s(&e["name"], "env.name").to_owned();
            if let Some(value) = e["value"].as_str() {
                return (name, value.to_owned());
            }
            // The downward API: the pod's own address is loopback here.
            let field = &e["valueFrom"]["fieldRef"]["fieldPath"];
            if !field.is_badvalue() {
                assert_eq!(field.as_str(), Some("status.podIP"), "env {name}");
                return (name, "127.0.0.1".to_owned());
            }
            let key_ref = &e["valueFrom"]["secretKeyRef"];
            let secret = find(docs, "Secret", s(&key_ref["name"], "secretKeyRef.name"))
                .unwrap_or_else(|| panic!("env {name}: its Secret is not in the manifests"));
            let value = s(
                &secret["stringData"][s(&key_ref["key"], "key")],
                "secret value",
            );
            (name, value.to_owned())
        })
        .collect();

    // The config file as mounted, then rewritten so its absolute paths point into the temp
    // dir; a path outside every mount is a file the pod does not have.
    let config = inside(config_path);
    let original = read(&config);
    let mut text = original.clone();
    let mut by_length: Vec<&String> = mounts.keys().collect();
    by_length.sort_by_key(|m| std::cmp::Reverse(m.len()));
    let root_text = root.path().to_string_lossy().into_owned();
    for mount in by_length {
        text = text.replace(&format!("\"{mount}"), &format!("\"{root_text}{mount}"));
    }
    let parsed = parse_toml(&text);
    fn strings(v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::String(s) => out.push(s.clone()),
            toml::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            toml::Value::Table(t) => t.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    strings(&parsed, &mut all);
    for value in all.iter().filter(|v| v.starts_with('/')) {
        assert!(
            value.starts_with(&root_text),
            "{config_path}: {value} is not on any volume the pod mounts"
        );
    }
    std::fs::write(&config, &text).expect("config");

    // The operator's TLS secret: a certificate for every registry host name.
    for dir in tls_dirs {
        let mut cmd = Command::new(BIN);
        cmd.args(["dev-certs", "--name", "tls", "--out"]).arg(&dir);
        for host in parsed["registry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("hosts")?.as_array())
            .flatten()
        {
            cmd.args(["--host", host.as_str().expect("host")]);
        }
        let out = cmd.output().expect("pullgate dev-certs");
        assert!(out.status.success(), "{}", show(&out));
    }

    let facts = facts(&parse_toml(&original));
    Pod {
        _root: root,
        config,
        text,
        env,
        facts,
        mounts,
    }
}
