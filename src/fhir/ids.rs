//! The ids, counters, instants and channel codes that the store records and the pipeline
//! hands from stage to stage, each its own type: a Task id cannot go where a subscription id
//! is meant, nor an event number where a version or an outbox position is.
//!
//! They are vocabulary shared by the store, the matcher, the hub, delivery and the API, so
//! they live here at the bottom, beside `interaction`. Each is transparent for the database
//! clients (`sqlx(transparent)`, and the same for rusqlite, the SQLite writer's: bound and
//! read back exactly as the bare text or integer, so no statement changes) and for serde (written into JSON as the bare value). An id a client
//! sends is validated once, where it comes in (`TaskId::parse`); an id read back from the
//! store, minted by the server (`generate`) or carried between nodes was valid when it was
//! first written, and is trusted.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IssueCode, Result};
use crate::fhir::datetime::{format_instant, parse_instant};
use crate::fhir::{ID_RULE, is_valid_id};

/// Bound and read back by the SQLite writer's client (rusqlite) exactly as the bare value, as
/// `sqlx(transparent)` does for sqlx.
macro_rules! rusqlite_transparent {
    ($name:ident, $inner:ty) => {
        impl rusqlite::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                self.0.to_sql()
            }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(
                value: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<$name> {
                <$inner as rusqlite::types::FromSql>::column_result(value).map($name)
            }
        }
    };
}

/// A resource id: text that passed `fhir::is_valid_id`.
macro_rules! resource_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(String);

        rusqlite_transparent!($name, String);

        impl $name {
            /// An id a client sent (in a URL, a query, a reference): a 400 naming the id rule
            /// unless it is a valid FHIR id.
            pub fn parse(text: &str) -> Result<$name> {
                if is_valid_id(text) {
                    Ok($name(text.to_string()))
                } else {
                    Err(Error::bad_request(
                        IssueCode::Invalid,
                        format!("'{text}' is not a valid FHIR id ({ID_RULE})"),
                    ))
                }
            }

            /// A new id assigned by the server: a UUID, which is a valid FHIR id, of version 7
            /// (a millisecond timestamp, then 74 random bits), so that ids this process
            /// generates sort in the order they were made. The id is the primary key of its
            /// rows and the leading column of their index rows: time-ordered ids append to
            /// those B-trees where random ones (version 4) would touch a different page for
            /// every write, which made each commit of the single SQLite writer two to three
            /// times slower for creates (BENCHMARKS.md, "Task server").
            pub fn generate() -> $name {
                $name(uuid::Uuid::now_v7().to_string())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Maps and sets keyed by id can be looked up with the text of one.
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

resource_id!(
    /// The id of a Task (`Task/{id}`).
    TaskId
);

resource_id!(
    /// The id of a Subscription (`Subscription/{id}`).
    SubscriptionId
);

/// A count that only grows, starting from 0 ("none yet") or 1 (the first).
macro_rules! counter {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug,
            Clone,
            Copy,
            PartialEq,
            Eq,
            Hash,
            PartialOrd,
            Ord,
            Serialize,
            Deserialize,
            sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(i64);

        rusqlite_transparent!($name, i64);

        impl $name {
            pub const fn new(value: i64) -> $name {
                $name(value)
            }

            /// The bare integer, for what is written outside Baton's own types (metrics, log
            /// fields, headers).
            pub const fn get(self) -> i64 {
                self.0
            }

            /// The one after this.
            pub const fn next(self) -> $name {
                $name(self.0 + 1)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = std::num::ParseIntError;

            fn from_str(text: &str) -> std::result::Result<$name, Self::Err> {
                text.parse().map($name)
            }
        }
    };
}

counter!(
    /// The version of a Task or of a subscription: 1 when created, one more with each write
    /// (`meta.versionId`, the ETag).
    Version
);

counter!(
    /// An event's number in its subscription's log: 1 for the first event matched after the
    /// subscription started, one more for each after it (`eventNumber`). As a position, 0 means
    /// "no event yet".
    EventNumber
);

counter!(
    /// A committed change's position in the outbox (`change_event.seq`). As a position, 0
    /// means "before every change".
    ChangeSeq
);

impl Version {
    /// The version a Task or subscription is created with.
    pub const FIRST: Version = Version(1);

    /// The version before this one; saturating, since a version a client names may be any
    /// integer.
    pub const fn previous(self) -> Version {
        Version(self.0.saturating_sub(1))
    }
}

impl EventNumber {
    /// Before the first event: what a subscription has delivered when it starts.
    pub const ZERO: EventNumber = EventNumber(0);

    /// The number `count` events on (saturating, for ranges a client asks for).
    pub const fn saturating_add(self, count: i64) -> EventNumber {
        EventNumber(self.0.saturating_add(count))
    }
}

impl ChangeSeq {
    /// Before every change: an empty outbox, or a consumer that has read nothing.
    pub const ZERO: ChangeSeq = ChangeSeq(0);
}

/// An instant as the store keeps it: UTC in Baton's fixed format
/// (`2026-01-01T00:00:00.000Z`), which sorts as text in time order, so the database compares
/// and orders instants as plain text.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type,
)]
#[serde(transparent)]
#[sqlx(transparent)]
pub struct StoredInstant(String);

rusqlite_transparent!(StoredInstant, String);

impl StoredInstant {
    /// Now, as stored.
    pub fn now() -> StoredInstant {
        StoredInstant::at(time::OffsetDateTime::now_utc())
    }

    /// `at`, as stored.
    pub fn at(at: time::OffsetDateTime) -> StoredInstant {
        StoredInstant(format_instant(at))
    }

    /// An RFC 3339 instant, in the stored format; None if it is not one.
    pub fn parse(text: &str) -> Option<StoredInstant> {
        parse_instant(text).map(StoredInstant::at)
    }

    /// The instant itself; None only for text the store holds that is not an instant.
    pub fn datetime(&self) -> Option<time::OffsetDateTime> {
        parse_instant(&self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StoredInstant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for StoredInstant {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// How a subscription's notifications leave the hub (`Subscription.channel.type`): the R4
/// channel types this hub delivers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelType {
    RestHook,
    WebSocket,
    /// AMQP, to the hub's broker.
    Message,
}

impl ChannelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelType::RestHook => "rest-hook",
            ChannelType::WebSocket => "websocket",
            ChannelType::Message => "message",
        }
    }

    pub fn parse(code: &str) -> Option<ChannelType> {
        match code {
            "rest-hook" => Some(ChannelType::RestHook),
            "websocket" => Some(ChannelType::WebSocket),
            "message" => Some(ChannelType::Message),
            _ => None,
        }
    }
}

impl fmt::Display for ChannelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::json;
    use sqlx::Connection;

    use super::*;

    #[test]
    fn ids_a_client_sends_are_validated() {
        let (longest, too_long) = ("x".repeat(64), "x".repeat(65));
        // (text, valid)
        let cases = [
            ("a", true),
            ("Task-1.2", true),
            (longest.as_str(), true),
            ("", false),
            (too_long.as_str(), false),
            ("..", false),
            ("a/b", false),
            ("a b", false),
            ("ü", false),
        ];
        for (text, valid) in cases {
            let task = TaskId::parse(text);
            let subscription = SubscriptionId::parse(text);
            assert_eq!(task.is_ok(), valid, "{text:?}");
            assert_eq!(subscription.is_ok(), valid, "{text:?}");
            match task {
                Ok(id) => assert_eq!(id.as_str(), text),
                Err(e) => {
                    assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST);
                    let Error::Client(refusal) = e else {
                        panic!("a client error")
                    };
                    assert_eq!(
                        refusal.diagnostics,
                        format!("'{text}' is not a valid FHIR id ({ID_RULE})")
                    );
                }
            }
        }
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let ids: HashSet<TaskId> = (0..100).map(|_| TaskId::generate()).collect();
        assert_eq!(ids.len(), 100);
        for id in &ids {
            assert_eq!(TaskId::parse(id.as_str()).ok().as_ref(), Some(id));
        }
        let id = SubscriptionId::generate();
        assert!(is_valid_id(id.as_str()));
        // In the order they were made, however close together.
        let made: Vec<TaskId> = (0..100).map(|_| TaskId::generate()).collect();
        let mut sorted = made.clone();
        sorted.sort();
        assert_eq!(sorted, made);
    }

    #[test]
    fn ids_are_looked_up_by_their_text_and_print_as_it() {
        let id = SubscriptionId::parse("sub-1").unwrap();
        let set = HashSet::from([id.clone()]);
        assert!(set.contains("sub-1"));
        assert_eq!(id.to_string(), "sub-1");
        assert_eq!(format!("Subscription/{id}"), "Subscription/sub-1");
        assert_eq!(json!(id), json!("sub-1"));
        assert_eq!(
            serde_json::from_value::<SubscriptionId>(json!("sub-1")).unwrap(),
            id
        );
    }

    #[test]
    fn counters_order_count_on_and_parse() {
        assert!(Version::FIRST < Version::FIRST.next());
        assert_eq!(Version::FIRST.next(), Version::new(2));
        assert_eq!(Version::new(3).previous(), Version::new(2));
        assert_eq!(Version::FIRST.previous(), Version::new(0));
        assert_eq!(Version::new(i64::MIN).previous(), Version::new(i64::MIN));
        assert_eq!("7".parse::<Version>(), Ok(Version::new(7)));
        assert!("W/7".parse::<Version>().is_err());
        assert_eq!(Version::new(7).to_string(), "7");

        assert_eq!(EventNumber::ZERO.next(), EventNumber::new(1));
        assert_eq!(
            EventNumber::new(5).saturating_add(99),
            EventNumber::new(104)
        );
        assert_eq!(
            EventNumber::new(i64::MAX - 1).saturating_add(99),
            EventNumber::new(i64::MAX)
        );
        let mut numbers = vec![EventNumber::new(3), EventNumber::ZERO, EventNumber::new(2)];
        numbers.sort();
        assert_eq!(numbers, [0, 2, 3].map(EventNumber::new));

        assert!(ChangeSeq::ZERO < ChangeSeq::new(1));
        assert_eq!(ChangeSeq::new(41).next().get(), 42);
        assert_eq!(json!(ChangeSeq::new(41)), json!(41));
    }

    #[test]
    fn stored_instants_sort_as_text_in_time_order() {
        let earlier = StoredInstant::parse("2026-01-01T00:00:00Z").unwrap();
        let later = StoredInstant::parse("2026-01-01T01:00:00.5+00:00").unwrap();
        assert_eq!(earlier.as_str(), "2026-01-01T00:00:00.000Z");
        assert_eq!(later.as_str(), "2026-01-01T01:00:00.500Z");
        assert!(earlier < later);
        assert!(earlier.as_str() < later.as_str());
        assert_eq!(StoredInstant::at(later.datetime().unwrap()), later);
        assert_eq!(
            StoredInstant::parse("2026-01-01T02:00:00+01:00"),
            Some(StoredInstant::parse("2026-01-01T01:00:00Z").unwrap()),
            "kept in UTC"
        );
        assert_eq!(StoredInstant::parse("2026-01-01"), None);
        assert_eq!(json!(earlier), json!("2026-01-01T00:00:00.000Z"));
        let now = StoredInstant::now();
        assert_eq!(StoredInstant::parse(now.as_str()), Some(now));
    }

    #[test]
    fn channel_types_read_back_as_written() {
        for channel in [
            ChannelType::RestHook,
            ChannelType::WebSocket,
            ChannelType::Message,
        ] {
            assert_eq!(ChannelType::parse(channel.as_str()), Some(channel));
            assert_eq!(channel.to_string(), channel.as_str());
        }
        assert_eq!(ChannelType::parse("email"), None);
        assert_eq!(ChannelType::parse("Rest-Hook"), None);
    }

    /// The database driver binds and reads them as the bare text and integers.
    #[tokio::test]
    async fn the_database_sees_the_bare_values() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        let (id, version, text): (TaskId, Version, String) =
            sqlx::query_as("SELECT ?, ?, typeof(?) || ' ' || typeof(?)")
                .bind(TaskId::parse("t-1").unwrap())
                .bind(Version::new(3))
                .bind(SubscriptionId::parse("s-1").unwrap())
                .bind(ChangeSeq::new(9))
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!((id.as_str(), version.get()), ("t-1", 3));
        assert_eq!(text, "text integer");
        let instant: StoredInstant = sqlx::query_scalar("SELECT '2026-01-01T00:00:00.000Z'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(instant.as_str(), "2026-01-01T00:00:00.000Z");
        let numbers: Vec<EventNumber> = sqlx::query_scalar("SELECT 1 UNION ALL SELECT 2")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(numbers, [EventNumber::new(1), EventNumber::new(2)]);
        conn.close().await.unwrap();
    }
}
