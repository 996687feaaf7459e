//! Loading: the built-in topics embedded in the binary, the operator's topic directory, and
//! how the two combine. It is kept apart because it is the one part of topics that does IO (the
//! directory is read at start-up).

use std::path::Path;

use serde_json::Value;

use super::Topic;
use super::parse::parse_topic;

/// The built-in topics, embedded so that the binary needs no files to run.
pub(super) const BUILTIN_TOPICS: &[(&str, &str)] = &[
    (
        "task-changed.json",
        include_str!("../../../config/topics/task-changed.json"),
    ),
    (
        "task-status-changed.json",
        include_str!("../../../config/topics/task-status-changed.json"),
    ),
    (
        "task-owner-changed.json",
        include_str!("../../../config/topics/task-owner-changed.json"),
    ),
    (
        "task-business-status-changed.json",
        include_str!("../../../config/topics/task-business-status-changed.json"),
    ),
    (
        "task-overdue.json",
        include_str!("../../../config/topics/task-overdue.json"),
    ),
];

/// The built-in topics (`config/topics/*.json`), with canonical URLs under `base_url`.
pub fn builtin_topics(base_url: &str) -> Result<Vec<Topic>, String> {
    let topics = BUILTIN_TOPICS
        .iter()
        .map(|(file, text)| {
            let source = format!("config/topics/{file}");
            parse_topic_text(text, base_url)
                .map(|topic| (source.clone(), topic))
                .map_err(|e| format!("{source}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_unique(&topics)?;
    Ok(topics.into_iter().map(|(_, topic)| topic).collect())
}

/// The operator's topics: every `*.json` file in `dir`, in file-name order.
pub fn load_topic_dir(dir: &Path, base_url: &str) -> Result<Vec<Topic>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the topic directory {}: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read the topic directory {}: {e}", dir.display()))?
            .path();
        // Editors leave hidden swap and backup files next to the real ones; they are not topics.
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if path.is_file() && !hidden && path.extension().is_some_and(|e| e == "json") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut topics = Vec::with_capacity(paths.len());
    for path in paths {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{source}: {e}"))?;
        let topic = parse_topic_text(&text, base_url).map_err(|e| format!("{source}: {e}"))?;
        topics.push((source, topic));
    }
    check_unique(&topics)?;
    Ok(topics.into_iter().map(|(_, topic)| topic).collect())
}

/// Joins the built-in and the operator's topics, refusing an operator topic that reuses a
/// built-in id or URL: subscriptions name topics by URL, so two topics with one URL would make
/// it a matter of chance which one a subscription gets.
pub fn combine_topics(builtin: Vec<Topic>, operator: Vec<Topic>) -> Result<Vec<Topic>, String> {
    let labelled: Vec<(String, Topic)> = builtin
        .into_iter()
        .map(|topic| ("the built-in topics".to_string(), topic))
        .chain(
            operator
                .into_iter()
                .map(|topic| ("the topic directory".to_string(), topic)),
        )
        .collect();
    check_unique(&labelled)?;
    Ok(labelled.into_iter().map(|(_, topic)| topic).collect())
}

fn check_unique(topics: &[(String, Topic)]) -> Result<(), String> {
    for (i, (source, topic)) in topics.iter().enumerate() {
        for (other_source, other) in &topics[..i] {
            if other.id == topic.id {
                return Err(format!(
                    "{source}: the SubscriptionTopic id '{}' is already used by {other_source}",
                    topic.id
                ));
            }
            if other.url == topic.url {
                return Err(format!(
                    "{source}: the SubscriptionTopic url '{}' is already used by {other_source} (topic '{}')",
                    topic.url, other.id
                ));
            }
        }
    }
    Ok(())
}

fn parse_topic_text(text: &str, base_url: &str) -> Result<Topic, String> {
    let definition: Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    parse_topic(&definition, base_url)
}
