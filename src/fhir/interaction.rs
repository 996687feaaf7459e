//! What a Task version records about how it came to be: the interaction codes of a
//! SubscriptionTopic's `resourceTrigger.supportedInteraction`, plus Baton's `overdue` event.
//!
//! It is vocabulary shared by the store (which records it with every version and change
//! event), the matcher (whose topic triggers test it) and notification building, so it lives
//! here at the bottom, where all three can use it without one of them importing another.

/// What a stored version records about how it came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    Create,
    Update,
    Delete,
    /// Not a REST interaction: the hub's timer saw the Task's due date pass.
    Overdue,
}

impl Interaction {
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
            Interaction::Overdue => "overdue",
        }
    }

    pub fn parse(text: &str) -> Option<Interaction> {
        match text {
            "create" => Some(Interaction::Create),
            "update" => Some(Interaction::Update),
            "delete" => Some(Interaction::Delete),
            "overdue" => Some(Interaction::Overdue),
            _ => None,
        }
    }
}
