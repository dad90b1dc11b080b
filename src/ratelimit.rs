//! Per-participant request quotas (governor), applied before a request body
//! is read so a flooding participant costs the gateway as little as
//! possible and cannot slow the others: each participant has its own
//! bucket, and a refused request is answered at once with 429.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::RateLimiter;

use crate::config::{Quota, RateLimitConfig};
use crate::participants::{Kind, Participant};

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// Outcome of a quota check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `remaining` requests are left in the burst.
    Allow {
        /// Quota in force.
        quota: Quota,
        /// Requests left before throttling.
        remaining: u32,
    },
    /// Refused; retry after the given time.
    Deny {
        /// Quota in force.
        quota: Quota,
        /// Earliest useful retry.
        retry_after: Duration,
    },
}

/// The buckets of every participant seen, created on first use.
pub struct RateLimits {
    /// Buckets by participant id; an entry is rebuilt when the quota changes.
    buckets: moka::sync::Cache<String, Arc<(Quota, Limiter)>>,
    /// Quotas of participants that have none of their own.
    defaults: RateLimitConfig,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("defaults", &self.defaults)
            .finish_non_exhaustive()
    }
}

impl RateLimits {
    /// Buckets with the given per-kind defaults.
    pub fn new(defaults: RateLimitConfig) -> RateLimits {
        RateLimits {
            buckets: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            defaults,
            clock: DefaultClock::default(),
        }
    }

    /// The quota in force for `p` on this instance: its share of the
    /// participant's quota when several instances share it.
    pub fn quota_of(&self, p: &Participant) -> Quota {
        let whole = p.quota.unwrap_or(match p.kind {
            Kind::Department => self.defaults.department,
            Kind::Agency => self.defaults.agency,
            Kind::Admin => self.defaults.admin,
        });
        let n = self.defaults.instances.max(1);
        Quota {
            per_second: whole.per_second.div_ceil(n),
            burst: whole.burst.div_ceil(n),
        }
    }

    /// Takes one request from `p`'s bucket.
    pub fn check(&self, p: &Participant) -> Decision {
        let quota = self.quota_of(p);
        let make = || {
            let per_second = NonZeroU32::new(quota.per_second).unwrap_or(NonZeroU32::MIN);
            let burst = NonZeroU32::new(quota.burst).unwrap_or(NonZeroU32::MIN);
            let q = governor::Quota::per_second(per_second).allow_burst(burst);
            Arc::new((
                quota,
                RateLimiter::direct(q).with_middleware::<StateInformationMiddleware>(),
            ))
        };
        let mut bucket = self.buckets.get_with_by_ref(&p.id, make);
        if bucket.0 != quota {
            bucket = make();
            self.buckets.insert(p.id.clone(), bucket.clone());
        }
        match bucket.1.check() {
            Ok(state) => Decision::Allow {
                quota,
                remaining: state.remaining_burst_capacity(),
            },
            Err(not_until) => Decision::Deny {
                quota,
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn department(quota: Option<Quota>) -> Participant {
        serde_json::from_value(serde_json::json!({
            "id": "dept-x", "kind": "department", "name": "x", "name_zh": "x", "quota": quota,
        }))
        .expect("participant")
    }

    #[test]
    fn each_instance_enforces_its_share_of_a_quota() {
        let own = Quota {
            per_second: 10,
            burst: 21,
        };
        let three = RateLimits::new(RateLimitConfig {
            instances: 3,
            ..RateLimitConfig::default()
        });
        // Rounded up: three instances together allow at least the quota.
        assert_eq!(
            three.quota_of(&department(Some(own))),
            Quota {
                per_second: 4,
                burst: 7
            }
        );
        let defaults = RateLimitConfig::default();
        assert_eq!(
            three.quota_of(&department(None)).per_second,
            defaults.department.per_second.div_ceil(3)
        );
        let one = RateLimits::new(defaults);
        assert_eq!(one.quota_of(&department(Some(own))), own);
        // The share is what the bucket holds: a burst of 7, then refusals.
        let p = department(Some(own));
        let allowed = (0..20)
            .filter(|_| matches!(three.check(&p), Decision::Allow { .. }))
            .count();
        assert_eq!(allowed, 7);
    }
}
