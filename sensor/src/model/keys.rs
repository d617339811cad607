//! The kinds of client key the agent counts under. Aggregation, detection, shipping and the
//! views all name them, so they live below all of those.

/// What a client is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum By {
    #[default]
    Address,
    Group,
    Identity,
    Forwarded,
}

impl By {
    pub const ALL: [By; 4] = [By::Address, By::Group, By::Identity, By::Forwarded];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == s)
    }

    pub fn name(self) -> &'static str {
        match self {
            By::Address => "address",
            By::Group => "group",
            By::Identity => "identity",
            By::Forwarded => "forwarded",
        }
    }
}
