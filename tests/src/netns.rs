//! A pod-like host: a network namespace joined to the host by a veth pair.
//!
//! Addresses are from 10.213.0.0/16 and exist only on the veths this guard creates, so traffic
//! to them never leaves the machine. Name resolution inside the namespace comes from
//! `/etc/netns/<name>/hosts`, which `ip netns exec` bind-mounts over `/etc/hosts`.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::sh;

/// A network namespace with a veth pair; deleted on drop.
pub struct Netns {
    name: String,
    host_if: String,
    host_addr: Ipv4Addr,
    pod_addr: Ipv4Addr,
    etc_dir: PathBuf,
}

impl Netns {
    /// Create namespace `<run tag>-<suffix>` with host end `10.213.<subnet>.1/24` and pod end
    /// `10.213.<subnet>.2/24`.
    pub fn create(suffix: &str, subnet: u8) -> Result<Self> {
        let name = format!("{}-{suffix}", crate::run_tag());
        // Interface names are at most 15 bytes.
        let id = format!("{}{subnet}", std::process::id() % 100_000);
        let host_if = format!("tgh{id}");
        let pod_if = format!("tgp{id}");
        let host_addr = Ipv4Addr::new(10, 213, subnet, 1);
        let pod_addr = Ipv4Addr::new(10, 213, subnet, 2);
        let etc_dir = PathBuf::from("/etc/netns").join(&name);
        // Leftovers from a crashed run with the same pid.
        let _ = sh("ip", &["netns", "del", &name]);
        let _ = sh("ip", &["link", "del", &host_if]);
        let ns = Netns { name, host_if, host_addr, pod_addr, etc_dir };
        sh("ip", &["netns", "add", &ns.name])?;
        sh("ip", &["link", "add", &ns.host_if, "type", "veth", "peer", "name", &pod_if, "netns", &ns.name])?;
        sh("ip", &["addr", "add", &format!("{host_addr}/24"), "dev", &ns.host_if])?;
        sh("ip", &["link", "set", &ns.host_if, "up"])?;
        sh("ip", &["-n", &ns.name, "addr", "add", &format!("{pod_addr}/24"), "dev", &pod_if])?;
        sh("ip", &["-n", &ns.name, "link", "set", &pod_if, "up"])?;
        sh("ip", &["-n", &ns.name, "link", "set", "lo", "up"])?;
        std::fs::create_dir_all(&ns.etc_dir).with_context(|| format!("mkdir {}", ns.etc_dir.display()))?;
        ns.set_hosts(&[])?;
        Ok(ns)
    }

    /// Namespace name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host-side veth address (the "node IP" as seen from the pod).
    pub fn host_addr(&self) -> Ipv4Addr {
        self.host_addr
    }

    /// Pod-side veth address.
    pub fn pod_addr(&self) -> Ipv4Addr {
        self.pod_addr
    }

    /// Write the namespace's `/etc/hosts`: `(address, name)` pairs plus localhost.
    pub fn set_hosts(&self, entries: &[(String, &str)]) -> Result<()> {
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost\n");
        for (a, n) in entries {
            text.push_str(&format!("{a} {n}\n"));
        }
        std::fs::write(self.etc_dir.join("hosts"), text)?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
        let _ = sh("ip", &["link", "del", &self.host_if]);
        let _ = std::fs::remove_dir_all(&self.etc_dir);
    }
}
