//! The configuration in force (catalog, participants, subscriptions) as
//! run-time-swappable handles. The control plane writes them; the request
//! path and delivery only read them, through this narrow handle rather than
//! the whole control plane.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::catalog::Catalog;
use crate::participants::Registry;
use crate::routing::Subscriptions;

/// Handles to what is in force; cheap to clone, read once per use.
#[derive(Debug, Clone)]
pub struct Active {
    /// Active catalog.
    pub catalog: Arc<ArcSwap<Catalog>>,
    /// Participants.
    pub registry: Arc<ArcSwap<Registry>>,
    /// Subscriptions.
    pub subscriptions: Arc<ArcSwap<Subscriptions>>,
}
