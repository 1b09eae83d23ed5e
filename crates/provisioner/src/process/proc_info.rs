//! Facts about processes from `/proc`, to tell our child from a stranger that reused its pid.

/// Start time of `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    // `rest` starts at field 3 (state); field 22 is index 19 here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True when `pid` is alive (not a zombie) and, if `start` is known, started at that time.
pub fn is_same_process(pid: i32, start: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some(close) = stat.rfind(')') else { return false };
    let rest = &stat[close + 2..];
    if rest.starts_with('Z') || rest.starts_with('X') {
        return false;
    }
    match start {
        Some(s) => rest.split_whitespace().nth(19).and_then(|v| v.parse::<u64>().ok()) == Some(s),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_itself() {
        let me = std::process::id() as i32;
        let st = start_time(me);
        assert!(st.is_some());
        assert!(is_same_process(me, st));
        assert!(!is_same_process(me, st.map(|s| s + 1)));
        assert!(!is_same_process(i32::MAX - 7, None));
    }
}
