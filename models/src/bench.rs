//! What the `x2v-bench-*` binaries share: their integer flags and the statistics they print.

/// Parses `argv` (the arguments after the program name) into `flags`: each entry is a flag name
/// and the values it sets, one (`--runs 3`) or several in a row (`--latent 2 32 32`). An unknown
/// flag, a missing value or one that is not an integer is an error naming the flag.
pub fn parse_flags(argv: &[String], flags: &mut [(&str, &mut [i64])]) -> Result<(), String> {
    let mut i = 0;
    while i < argv.len() {
        let name = argv[i].as_str();
        let Some((_, slots)) = flags.iter_mut().find(|(n, _)| *n == name) else {
            return Err(format!("unknown flag {name}"));
        };
        for (k, slot) in slots.iter_mut().enumerate() {
            let v = argv.get(i + 1 + k).ok_or(format!("{name} needs a value"))?;
            *slot = v.parse().map_err(|e| format!("{name}: {e}"))?;
        }
        i += 1 + slots.len();
    }
    Ok(())
}

/// The median (the mean of the two middle values for an even count); sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The smallest value (infinity for none).
pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn flags_set_one_or_several_values_and_errors_name_the_flag() {
        let (mut runs, mut size) = (1, [0, 0]);
        let mut flags = [("--runs", std::slice::from_mut(&mut runs)), ("--size", &mut size[..])];
        parse_flags(&argv("--size 64 96 --runs 3"), &mut flags).unwrap();
        assert_eq!((runs, size), (3, [64, 96]));
        let mut flags = [("--runs", std::slice::from_mut(&mut runs)), ("--size", &mut size[..])];
        for (line, says) in [
            ("--rns 2", "unknown flag --rns"),
            ("--size 64", "--size needs a value"),
            ("--runs x", "--runs: invalid digit"),
        ] {
            let err = parse_flags(&argv(line), &mut flags).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
        assert_eq!(median(&mut [3.0, 1.0, 2.0, 10.0]), 2.5);
        assert_eq!(min(&[3.0, 1.0]), 1.0);
    }
}
