//! A bounded cache of forwarded answers, each kept as long as the upstream's TTLs allow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, RData, Record, RecordType};

/// No answer is kept longer than this, whatever its TTL says.
pub const MAX_TTL: u32 = 3600;

/// An upstream's answer: its code and sections (without the OPT record).
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    pub fn from_message(msg: Message) -> Answer {
        Answer {
            rcode: msg.metadata.response_code,
            answers: msg.answers,
            authorities: msg.authorities,
            // The OPT pseudo-record is parsed into `edns`; drop any stray one still here.
            additionals: msg
                .additionals
                .into_iter()
                .filter(|r| r.record_type() != RecordType::OPT)
                .collect(),
        }
    }

    /// How long the answer may be cached (RFC 2308 for negative answers), if at all.
    pub fn cache_ttl(&self) -> Option<u32> {
        let ttl = match self.rcode {
            ResponseCode::NoError if !self.answers.is_empty() => self
                .answers
                .iter()
                .chain(&self.authorities)
                .chain(&self.additionals)
                .map(|r| r.ttl)
                .min()?,
            ResponseCode::NoError | ResponseCode::NXDomain => {
                self.authorities.iter().find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })?
            }
            _ => return None,
        };
        (ttl > 0).then_some(ttl.min(MAX_TTL))
    }

    /// The answer with every TTL lowered by `elapsed` seconds.
    fn aged(&self, elapsed: u32) -> Answer {
        let age = |records: &[Record]| {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = r.ttl.saturating_sub(elapsed);
                    r
                })
                .collect()
        };
        Answer {
            rcode: self.rcode,
            answers: age(&self.answers),
            authorities: age(&self.authorities),
            additionals: age(&self.additionals),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub name: LowerName,
    pub qtype: RecordType,
    pub class: DNSClass,
}

struct Entry {
    answer: Arc<Answer>,
    stored: Instant,
    expires: Instant,
}

/// At most `capacity` answers. When full, expired answers go first, then an arbitrary eighth
/// of the rest, so inserting stays cheap on average and memory stays bounded.
pub struct Cache {
    capacity: usize,
    map: Mutex<HashMap<Key, Entry>>,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache {
            capacity,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // Entries are inserted and removed whole; a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached answer with its TTLs counted down, while it has not expired.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Answer> {
        let (answer, stored) = {
            let mut map = self.map();
            let entry = map.get(key)?;
            if entry.expires <= now {
                map.remove(key);
                return None;
            }
            (entry.answer.clone(), entry.stored)
        };
        let elapsed = u32::try_from(now.duration_since(stored).as_secs()).unwrap_or(u32::MAX);
        Some(answer.aged(elapsed))
    }

    /// Keeps `answer` if it is cacheable.
    pub fn insert(&self, key: Key, answer: &Answer, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        let Some(ttl) = answer.cache_ttl() else {
            return;
        };
        let entry = Entry {
            answer: Arc::new(answer.clone()),
            stored: now,
            expires: now + Duration::from_secs(u64::from(ttl)),
        };
        let mut map = self.map();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, e| e.expires > now);
            if map.len() >= self.capacity {
                let evict = (self.capacity / 8).max(1);
                let victims: Vec<Key> = map.keys().take(evict).cloned().collect();
                for k in victims {
                    map.remove(&k);
                }
            }
        }
        map.insert(key, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn a(name: &str, ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            ttl,
            RData::A(A::new(192, 0, 2, 1)),
        )
    }

    fn key(name: &str) -> Key {
        Key {
            name: LowerName::from_str(name).unwrap(),
            qtype: RecordType::A,
            class: DNSClass::IN,
        }
    }

    fn positive(ttl: u32) -> Answer {
        Answer {
            rcode: ResponseCode::NoError,
            answers: vec![a("www.example.", ttl), a("www.example.", ttl + 10)],
            authorities: vec![],
            additionals: vec![],
        }
    }

    #[test]
    fn ttls_decide_how_long_and_count_down() {
        assert_eq!(positive(30).cache_ttl(), Some(30));
        assert_eq!(positive(0).cache_ttl(), None);
        assert_eq!(positive(999_999).cache_ttl(), Some(MAX_TTL));
        let soa = Record::from_rdata(
            Name::from_str("example.").unwrap(),
            300,
            RData::SOA(SOA::new(Name::root(), Name::root(), 1, 1, 1, 1, 60)),
        );
        let negative = Answer {
            rcode: ResponseCode::NXDomain,
            answers: vec![],
            authorities: vec![soa],
            additionals: vec![],
        };
        assert_eq!(negative.cache_ttl(), Some(60));
        let servfail = Answer {
            rcode: ResponseCode::ServFail,
            ..negative.clone()
        };
        assert_eq!(servfail.cache_ttl(), None);
        let no_soa = Answer {
            authorities: vec![],
            ..negative
        };
        assert_eq!(no_soa.cache_ttl(), None);

        let cache = Cache::new(10);
        let t0 = Instant::now();
        cache.insert(key("www.example."), &positive(30), t0);
        let hit = cache
            .get(&key("www.example."), t0 + Duration::from_secs(12))
            .expect("cached");
        assert_eq!(hit.answers[0].ttl, 18);
        assert_eq!(hit.answers[1].ttl, 28);
        assert!(cache
            .get(&key("www.example."), t0 + Duration::from_secs(30))
            .is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn stays_within_capacity() {
        let cache = Cache::new(16);
        let t0 = Instant::now();
        for i in 0..1000 {
            cache.insert(key(&format!("n{i}.example.")), &positive(60), t0);
            assert!(cache.len() <= 16);
        }
        // The newest is always kept.
        assert!(cache.get(&key("n999.example."), t0).is_some());
        let off = Cache::new(0);
        off.insert(key("a.example."), &positive(60), t0);
        assert!(off.is_empty());
    }
}
