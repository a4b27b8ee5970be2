//! The schedules file (`APIARY_SCHEDULES_FILE`): schedules declared in TOML, which `apiary
//! migrate` applies. Each `[schedules.<name>]` table is a [`ScheduleSpec`]:
//!
//! ```toml
//! [schedules.nightly]
//! cron = "0 2 * * *"
//! timezone = "Europe/Berlin"
//! kind = "report"
//! payload = { full = true }
//! missed = "one"
//! ```
//!
//! TOML only: the YAML crates for serde are unmaintained (`serde_yaml` is archived) or
//! carry unsoundness advisories (`serde_yml`), and a file of schedules needs nothing YAML
//! has that TOML lacks. The whole file is checked before anything is written; a bad file
//! is a configuration error naming the file, the schedule and the field.

use std::path::Path;

use chrono::{DateTime, Utc};

use super::ScheduleSpec;
use crate::config::ConfigError;

/// Reads and checks the schedules file at `path`: every schedule it declares, by name, in
/// name order. `now` is when they would start (for the check that each ever fires).
pub fn load(
    path: &Path,
    max_payload_bytes: usize,
    now: DateTime<Utc>,
) -> Result<Vec<(String, ScheduleSpec)>, ConfigError> {
    let shown = path.display();
    let bad = |what: String| ConfigError(format!("APIARY_SCHEDULES_FILE: {shown}: {what}"));
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml") => {}
        Some("yaml" | "yml") => {
            return Err(bad(
                "YAML is not supported (its serde crates are unmaintained); write the schedules \
                 as TOML in a .toml file"
                    .into(),
            ));
        }
        _ => return Err(bad("expected a .toml file".into())),
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    parse(&text, max_payload_bytes, now).map_err(bad)
}

/// [`load`] on the text of a file; the error names the schedule and the field.
pub fn parse(
    text: &str,
    max_payload_bytes: usize,
    now: DateTime<Utc>,
) -> Result<Vec<(String, ScheduleSpec)>, String> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.message()))?;
    let schedules = match table.remove("schedules") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err("`schedules` must be a table of [schedules.<name>]".into()),
    };
    if let Some(other) = table.keys().next() {
        return Err(format!(
            "unknown key {other:?}; schedules go in [schedules.<name>] tables"
        ));
    }
    let mut out = Vec::with_capacity(schedules.len());
    for (name, value) in schedules {
        let named = |field: &str, reason: &str| format!("schedule {name}: {field}: {reason}");
        let spec: ScheduleSpec = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { "schedule" } else { &path };
            named(field, e.into_inner().message())
        })?;
        spec.validate(&name, max_payload_bytes, now)
            .map_err(|e| named(e.field, &e.reason))?;
        out.push((name, spec));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc::now()
    }

    #[test]
    fn a_file_declares_schedules_by_name() {
        let got = parse(
            r#"
            [schedules.nightly]
            cron = "0 2 * * *"
            timezone = "Europe/Berlin"
            kind = "report"
            payload = { full = true }

            [schedules.tick]
            cron = "* * * * * *"
            kind = "echo"
            missed = "skip"
            priority = 3
            "#,
            1024,
            now(),
        )
        .expect("parse");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "nightly");
        assert_eq!(got[0].1.payload, serde_json::json!({"full": true}));
        assert_eq!(got[1].1.missed, super::super::Missed::Skip);
        assert_eq!(got[1].1.timezone, "UTC");
        assert!(parse("", 1024, now()).expect("empty").is_empty());
    }

    #[test]
    fn errors_name_the_schedule_and_the_field() {
        let err = |text: &str| parse(text, 1024, now()).unwrap_err();
        let e = err("[schedules.nightly]\ncron = \"nope\"\nkind = \"report\"\n");
        assert!(e.starts_with("schedule nightly: cron: "), "{e}");
        let e = err("[schedules.nightly]\ncron = \"* * * * *\"\nkind = \"report\"\ncolour = 1\n");
        assert!(
            e.contains("schedule nightly") && e.contains("colour"),
            "{e}"
        );
        let e = err(
            "[schedules.nightly]\ncron = \"* * * * *\"\nkind = \"report\"\npriority = \"high\"\n",
        );
        assert!(e.starts_with("schedule nightly: priority: "), "{e}");
        let e = err("[schedules.Bad]\ncron = \"* * * * *\"\nkind = \"report\"\n");
        assert!(e.starts_with("schedule Bad: name: "), "{e}");
        let e = err("[schedules.n]\ncron = \"* * * * *\"\n");
        assert!(e.contains("schedule n") && e.contains("kind"), "{e}");
        assert!(err("cron = 1").contains("unknown key"));
        assert!(err("[schedules").contains("not valid TOML"));
    }
}
