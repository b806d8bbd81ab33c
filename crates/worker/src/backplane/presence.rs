//! The online list as a worker holds it locally: every user of the cluster,
//! in one order (oldest socket first, ties broken by WebSocket ID), so every
//! worker renders the same list from the same entries.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::Presence;
use crate::app::WsId;

#[derive(Default)]
pub struct PresenceTable {
    by_ws: HashMap<WsId, Presence>,
    order: BTreeMap<(u64, WsId), Arc<str>>,
    /// Who holds each alias (more than one only in a race between workers).
    by_alias: HashMap<Arc<str>, Vec<WsId>>,
}

impl PresenceTable {
    /// Adds or updates a user; true when the list changed.
    pub fn set(&mut self, user: Presence) -> bool {
        if self.by_ws.get(&user.ws) == Some(&user) {
            return false;
        }
        self.remove(user.ws);
        self.order
            .insert((user.opened_ms, user.ws), user.alias.clone());
        self.by_alias
            .entry(user.alias.clone())
            .or_default()
            .push(user.ws);
        self.by_ws.insert(user.ws, user);
        true
    }

    /// True when the user was listed.
    pub fn remove(&mut self, ws: WsId) -> bool {
        match self.by_ws.remove(&ws) {
            Some(old) => {
                self.order.remove(&(old.opened_ms, ws));
                if let Some(holders) = self.by_alias.get_mut(&old.alias) {
                    holders.retain(|w| *w != ws);
                    if holders.is_empty() {
                        self.by_alias.remove(&old.alias);
                    }
                }
                true
            }
            None => false,
        }
    }

    /// Removes every user of a gateway run; true when any was listed.
    pub fn remove_boot(&mut self, boot: u64) -> bool {
        let gone: Vec<WsId> = self
            .by_ws
            .values()
            .filter(|p| p.boot == boot)
            .map(|p| p.ws)
            .collect();
        for ws in &gone {
            self.remove(*ws);
        }
        !gone.is_empty()
    }

    /// Replaces the whole table; true when the list changed.
    pub fn replace(&mut self, users: Vec<Presence>) -> bool {
        let mut next = PresenceTable::default();
        for user in users {
            next.set(user);
        }
        let changed = next.order != self.order;
        *self = next;
        changed
    }

    /// A socket other than `ws` listed under `alias`.
    pub fn held_by_other(&self, alias: &str, ws: WsId) -> Option<WsId> {
        self.by_alias
            .get(alias)
            .and_then(|holders| holders.iter().copied().find(|w| *w != ws))
    }

    /// Aliases, oldest socket first.
    pub fn list(&self) -> Vec<String> {
        self.order.values().map(|a| a.to_string()).collect()
    }

    pub fn len(&self) -> usize {
        self.by_ws.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ws.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(ws: WsId, boot: u64, alias: &str, opened_ms: u64) -> Presence {
        Presence {
            ws,
            boot,
            alias: alias.into(),
            opened_ms,
        }
    }

    #[test]
    fn oldest_socket_first_across_gateways() {
        let mut t = PresenceTable::default();
        assert!(t.set(user(5, 1, "late", 300)));
        assert!(t.set(user(9, 2, "early", 100)));
        assert!(t.set(user(7, 1, "mid", 200)));
        assert!(!t.set(user(7, 1, "mid", 200)), "same entry: no change");
        assert_eq!(t.list(), ["early", "mid", "late"]);
        assert!(t.set(user(7, 1, "renamed", 200)));
        assert_eq!(t.list(), ["early", "renamed", "late"]);
        assert!(t.remove_boot(1));
        assert_eq!(t.list(), ["early"]);
        assert_eq!(t.held_by_other("early", 1), Some(9));
        assert_eq!(t.held_by_other("early", 9), None);
        assert!(!t.replace(vec![user(9, 2, "early", 100)]));
        assert_eq!(t.held_by_other("renamed", 1), None);
    }
}
