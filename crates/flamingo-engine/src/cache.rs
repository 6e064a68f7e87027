//! A byte-bounded LRU map, used for the vision-feature cache and the prefix KV cache.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

/// LRU map bounded by the total size of its values in bytes. Values are shared (`Arc`), so an
/// entry evicted while a sequence still uses it stays alive for that sequence.
pub struct LruBytes<K, V> {
    map: HashMap<K, (Arc<V>, usize, u64)>,
    order: BTreeMap<u64, K>,
    bytes: usize,
    capacity: usize,
    tick: u64,
    evictions: u64,
}

impl<K: Hash + Eq + Clone, V> LruBytes<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { map: HashMap::new(), order: BTreeMap::new(), bytes: 0, capacity, tick: 0, evictions: 0 }
    }

    /// Looks a key up and marks it most recently used.
    pub fn get(&mut self, k: &K) -> Option<Arc<V>> {
        self.tick += 1;
        let tick = self.tick;
        let (v, _, t) = self.map.get_mut(k)?;
        self.order.remove(t);
        *t = tick;
        self.order.insert(tick, k.clone());
        Some(v.clone())
    }

    pub fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    /// Inserts (or refreshes) a value, evicting least recently used entries until it fits.
    /// A value larger than the whole capacity is not kept. Returns the number evicted.
    pub fn insert(&mut self, k: K, v: Arc<V>, bytes: usize) -> usize {
        if let Some((_, b, t)) = self.map.remove(&k) {
            self.order.remove(&t);
            self.bytes -= b;
        }
        if bytes > self.capacity {
            return 0;
        }
        let mut evicted = 0;
        while self.bytes + bytes > self.capacity {
            let Some((&t, _)) = self.order.iter().next() else { break };
            if let Some(old) = self.order.remove(&t) {
                if let Some((_, b, _)) = self.map.remove(&old) {
                    self.bytes -= b;
                    evicted += 1;
                }
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, k.clone());
        self.map.insert(k, (v, bytes, self.tick));
        self.bytes += bytes;
        self.evictions += evicted as u64;
        evicted
    }

    /// Takes an entry out (no eviction counted): its value and bytes.
    pub fn remove(&mut self, k: &K) -> Option<(Arc<V>, usize)> {
        let (v, b, t) = self.map.remove(k)?;
        self.order.remove(&t);
        self.bytes -= b;
        Some((v, b))
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

/// Entries pinned by reference count: never evicted while a holder (a demonstration set) refers
/// to them. The byte budget is the caller's ([`crate::Scheduler`] checks it before pinning).
pub struct Pinned<K, V> {
    map: HashMap<K, (Arc<V>, usize, usize)>,
    bytes: usize,
}

impl<K: Hash + Eq + Clone, V> Default for Pinned<K, V> {
    fn default() -> Self {
        Self { map: HashMap::new(), bytes: 0 }
    }
}

impl<K: Hash + Eq + Clone, V> Pinned<K, V> {
    pub fn get(&self, k: &K) -> Option<Arc<V>> {
        self.map.get(k).map(|e| e.0.clone())
    }

    pub fn contains(&self, k: &K) -> bool {
        self.map.contains_key(k)
    }

    /// One more reference to an entry already pinned, else a new entry with one reference.
    pub fn pin(&mut self, k: K, v: Arc<V>, bytes: usize) {
        if let Some(e) = self.map.get_mut(&k) {
            e.2 += 1;
            return;
        }
        self.map.insert(k, (v, bytes, 1));
        self.bytes += bytes;
    }

    /// Drops one reference; the last one unpins the entry and returns it with its bytes.
    pub fn release(&mut self, k: &K) -> Option<(Arc<V>, usize)> {
        let e = self.map.get_mut(k)?;
        e.2 -= 1;
        if e.2 > 0 {
            return None;
        }
        let (v, b, _) = self.map.remove(k)?;
        self.bytes -= b;
        Some((v, b))
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let mut c = LruBytes::new(100);
        c.insert("a", Arc::new(1), 40);
        c.insert("b", Arc::new(2), 40);
        assert!(c.get(&"a").is_some()); // a is now more recent than b
        assert_eq!(c.insert("c", Arc::new(3), 40), 1);
        assert!(c.contains(&"a") && c.contains(&"c") && !c.contains(&"b"));
        assert_eq!(c.bytes(), 80);
        // Too large for the cache: not kept, nothing evicted.
        assert_eq!(c.insert("big", Arc::new(4), 101), 0);
        assert!(!c.contains(&"big"));
        // Re-inserting replaces without double counting.
        c.insert("a", Arc::new(5), 10);
        assert_eq!(c.bytes(), 50);
        assert_eq!(c.evictions(), 1);
        // A value still held elsewhere survives eviction.
        let held = c.get(&"c").unwrap();
        c.insert("d", Arc::new(6), 95);
        assert!(!c.contains(&"c"));
        assert_eq!(*held, 3);
        assert_eq!(c.remove(&"d").map(|(v, b)| (*v, b)), Some((6, 95)));
        assert_eq!((c.bytes(), c.evictions()), (0, 3), "d took a's room too");
    }

    #[test]
    fn pinned_entries_live_until_their_last_reference_goes() {
        let mut p = Pinned::default();
        p.pin("a", Arc::new(1), 40);
        p.pin("a", Arc::new(9), 40);
        p.pin("b", Arc::new(2), 10);
        assert_eq!((p.bytes(), p.len()), (50, 2), "a second reference adds no bytes");
        assert!(p.release(&"a").is_none(), "one reference is left");
        assert_eq!(p.get(&"a").map(|v| *v), Some(1));
        assert_eq!(p.release(&"a").map(|(v, b)| (*v, b)), Some((1, 40)));
        assert_eq!((p.bytes(), p.contains(&"a"), p.release(&"a").is_none()), (10, false, true));
    }
}
