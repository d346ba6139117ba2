//! Giving back the memory of code that ran once.
//!
//! Starting a gateway and compiling SQL runs a great deal of code that a running pipeline
//! never calls again: configuration, DataFusion's function registry and planner, the
//! planner's checks. The kernel maps the `weir` binary's code on first use, and maps the
//! pages around each one as well, so by the time the pipelines run, about 40 MB of the
//! binary's code is resident, of which the pipelines use a few. These pages stay mapped until
//! the process ends, or until memory runs short and the kernel reclaims them.
//!
//! [`release_startup_code`] unmaps the binary's code from the process after start-up and
//! after each deploy. The code stays in the kernel's page cache (nothing is read from disk
//! again while it is there); what the pipelines run next is mapped back on first use, and
//! the process's resident set is then what it uses.

/// Unmaps the `weir` binary's code pages from this process; they are mapped again, from the
/// page cache, when next executed. Returns the resident bytes given back. Does nothing, and
/// returns 0, on systems other than Linux and for code the process has written to (which
/// cannot be read back from the file).
pub fn release_startup_code() -> std::io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        linux::release_startup_code()
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(0)
    }
}

/// [`release_startup_code`], logging what it did; for the places that deploy pipelines.
pub fn release_startup_code_logged() {
    match release_startup_code() {
        Ok(bytes) => tracing::debug!(released_mb = bytes >> 20, "released start-up code pages"),
        Err(error) => tracing::debug!(%error, "cannot release start-up code pages"),
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;

    /// One mapping of `/proc/self/smaps` and the sizes that matter here.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Mapping {
        pub start: usize,
        pub end: usize,
        pub perms: String,
        pub path: String,
        pub rss_kb: u64,
        /// Copy-on-write pages (kB): contents the file no longer has.
        pub anonymous_kb: u64,
    }

    #[allow(unsafe_code)]
    pub(super) fn release_startup_code() -> io::Result<u64> {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let exe = exe.to_string_lossy();
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut released = 0;
        for mapping in parse_smaps(&smaps) {
            // Only the binary's executable code, and only if every page still equals the file.
            if mapping.path != exe || mapping.perms != "r-xp" || mapping.anonymous_kb != 0 {
                continue;
            }
            // SAFETY: the range is a whole private, read-only file mapping of the binary with
            // no page written to (checked above); MADV_DONTNEED on it drops the page-table
            // entries only, and the next access maps the same file contents again.
            let result = unsafe {
                libc::madvise(
                    mapping.start as *mut libc::c_void,
                    mapping.end - mapping.start,
                    libc::MADV_DONTNEED,
                )
            };
            if result != 0 {
                return Err(io::Error::last_os_error());
            }
            released += mapping.rss_kb * 1024;
        }
        Ok(released)
    }

    /// The mappings of an smaps text, with their resident and copy-on-write sizes.
    pub(super) fn parse_smaps(smaps: &str) -> Vec<Mapping> {
        let mut mappings: Vec<Mapping> = Vec::new();
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let Some(first) = fields.next() else {
                continue;
            };
            if let Some((start, end)) = first.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                let perms = fields.next().unwrap_or_default().to_owned();
                // offset, device, inode, then the path, which may contain spaces.
                let path = fields.skip(3).collect::<Vec<_>>().join(" ");
                mappings.push(Mapping {
                    start,
                    end,
                    perms,
                    path,
                    rss_kb: 0,
                    anonymous_kb: 0,
                });
                continue;
            }
            let Some(mapping) = mappings.last_mut() else {
                continue;
            };
            let kb = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match first {
                "Rss:" => mapping.rss_kb = kb,
                "Anonymous:" => mapping.anonymous_kb = kb,
                _ => {}
            }
        }
        mappings
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::{Mapping, parse_smaps};
    use super::release_startup_code;

    /// Resident kB of the test binary's code.
    fn code_rss_kb() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        parse_smaps(&smaps)
            .iter()
            .filter(|m| m.path == exe.to_string_lossy() && m.perms == "r-xp")
            .map(|m| m.rss_kb)
            .sum()
    }

    fn compiles(select: &str) {
        let sql = format!(
            "CREATE SOURCE s (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE, \
             WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'simulator');
             CREATE SINK out WITH (connector = 'stdout');
             CREATE PIPELINE p AS INSERT INTO out {select};"
        );
        if let Err(errors) = weir_planner::compile(&sql) {
            panic!("does not compile:\n{}", errors.render("test.sql"));
        }
    }

    #[test]
    fn smaps_mappings_are_read_with_their_sizes() {
        let smaps = "\
55d0c8a00000-55d0cf200000 r-xp 01e00000 fd:01 1234                       /opt/weir dir/weir
Size:             106496 kB
Rss:               45060 kB
Anonymous:             0 kB
7f0000000000-7f0040000000 rw-p 00000000 00:00 0 
Rss:               22792 kB
Anonymous:         22792 kB
";
        assert_eq!(
            parse_smaps(smaps),
            vec![
                Mapping {
                    start: 0x55d0c8a00000,
                    end: 0x55d0cf200000,
                    perms: "r-xp".into(),
                    path: "/opt/weir dir/weir".into(),
                    rss_kb: 45060,
                    anonymous_kb: 0,
                },
                Mapping {
                    start: 0x7f0000000000,
                    end: 0x7f0040000000,
                    perms: "rw-p".into(),
                    path: String::new(),
                    rss_kb: 22792,
                    anonymous_kb: 22792,
                },
            ]
        );
    }

    #[test]
    fn released_code_leaves_the_resident_set_and_still_runs() {
        // Run plenty of code first, so that there is something to give back.
        compiles(
            "SELECT sensor, window_start, max(abs(v)) AS peak \
             FROM TUMBLE(s, ts, INTERVAL '1' SECOND) WHERE v > 0 GROUP BY sensor, window_start",
        );
        let before = code_rss_kb();
        let released = release_startup_code().expect("madvise");
        let after = code_rss_kb();
        assert!(
            released > 0,
            "nothing released ({before} kB resident before)"
        );
        assert!(
            after < before / 2,
            "code resident before {before} kB, after {after} kB"
        );
        // The code runs again once mapped back.
        compiles("SELECT sensor, sqrt(v) AS r FROM s");
    }
}
