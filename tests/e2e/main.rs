//! End-to-end tests: pullgate in front of the real distribution registry (bearer-token auth over
//! TLS), pulled through by real clients (skopeo, containerd's ctr, dockerd, podman). One test
//! binary, so the costly link happens once; tests run in parallel on ports chosen at run time.

#[path = "../support/mod.rs"]
mod support;

mod api;
mod harness;

mod auth;
mod cache;
mod challenges;
mod cli;
mod clients;
mod cluster;
mod cluster_tags;
mod containerd;
mod crash;
mod credentials;
mod data_endpoints;
mod deletes;
mod digests;
mod dns_members;
mod encryption;
mod errors;
mod faults;
mod input;
mod l2;
mod manifests;
mod negotiation;
mod observability;
mod offline;
mod policy;
mod proxy_protocol;
mod pull;
mod push;
mod redirects;
mod referrers;
mod reload;
mod routing;
mod signatures;
mod soak;
mod tls;
mod upgrade;
mod uploads;
mod warm;
