//! What the soak samples from outside the tollgate process: RSS and threads
//! (`/proc/PID/status`), open fds (`/proc/PID/fd`), and the entry count of each eBPF hash map the
//! process holds. tollgate exports no map sizes, so the maps are found through the process's
//! own fds (`/proc/PID/fdinfo` names a `map_id`) and walked with `BPF_MAP_GET_NEXT_KEY`: no
//! bpftool, and only this tollgate's maps even when other tollgates run on the machine.

use std::collections::BTreeMap;

/// One sample of the tollgate process.
#[derive(Debug, Clone, Default)]
pub struct Proc {
    /// Resident set, KiB.
    pub rss_kb: u64,
    /// ... of which anonymous memory (heap, stacks), KiB.
    pub rss_anon_kb: u64,
    /// ... of which file-backed pages (the binary's code and data as touched), KiB.
    pub rss_file_kb: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Entries per hash map, by map name.
    pub maps: BTreeMap<String, u64>,
}

/// Sample `pid` now; `None` when the process is gone.
pub fn proc(pid: u32) -> Option<Proc> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Proc {
        rss_kb: field("VmRSS:"),
        rss_anon_kb: field("RssAnon:"),
        rss_file_kb: field("RssFile:"),
        threads: field("Threads:"),
        fds,
        maps: map_counts(pid),
    })
}

/// `map_id` and `map_type` of every BPF map fd of `pid`, deduplicated.
fn map_ids(pid: u32) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return out };
    for e in rd.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
        let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().parse::<u32>().ok());
        if let (Some(id), Some(ty)) = (get("map_id:"), get("map_type:")) {
            if !out.iter().any(|(i, _)| *i == id) {
                out.push((id, ty));
            }
        }
    }
    out
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// Hash-like map types whose entries come and go (hash, LRU hash and their per-CPU kinds, LPM
/// trie); arrays always hold `max_entries`.
const COUNTED_TYPES: [u32; 5] = [1, 5, 9, 10, 11];

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
    // SAFETY: `attr` is a zero-initialised 128-byte buffer laid out as the `union bpf_attr`
    // member `cmd` reads; the kernel accepts a larger-than-needed size when the tail is zero.
    unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) }
}

/// Entries of each counted map of `pid`, by name (`name#id` when two maps share a name).
pub fn map_counts(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (id, ty) in map_ids(pid) {
        if !COUNTED_TYPES.contains(&ty) {
            continue;
        }
        let mut attr = [0u64; 16];
        attr[0] = id as u64; // map_id (u32) at offset 0, next_id and open_flags zero
        let fd = bpf(BPF_MAP_GET_FD_BY_ID, &mut attr);
        if fd < 0 {
            continue;
        }
        let fd = fd as i32;
        // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags (u32 each),
        // then name[16].
        let mut info = [0u8; 88];
        let mut attr = [0u64; 16];
        attr[0] = fd as u64 | ((info.len() as u64) << 32); // bpf_fd, info_len
        attr[1] = info.as_mut_ptr() as u64;
        let name = if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) == 0 {
            let raw = &info[24..40];
            let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        } else {
            format!("map{id}")
        };
        let key_size = u32::from_ne_bytes([info[8], info[9], info[10], info[11]]).max(1) as usize;
        let max_entries = u32::from_ne_bytes([info[16], info[17], info[18], info[19]]) as u64;
        let mut key = vec![0u8; key_size];
        let mut next = vec![0u8; key_size];
        let mut n = 0u64;
        let mut first = true;
        // The walk restarts from the first key when an entry vanishes under it, so cap it.
        while n <= max_entries.max(1) * 2 {
            let mut attr = [0u64; 16];
            attr[0] = fd as u64;
            attr[1] = if first { 0 } else { key.as_ptr() as u64 };
            attr[2] = next.as_mut_ptr() as u64;
            if bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) != 0 {
                break;
            }
            first = false;
            n += 1;
            std::mem::swap(&mut key, &mut next);
        }
        // SAFETY: `fd` came from BPF_MAP_GET_FD_BY_ID above and is closed once.
        unsafe { libc::close(fd) };
        let label = if out.contains_key(&name) { format!("{name}#{id}") } else { name };
        out.insert(label, n);
    }
    out
}
