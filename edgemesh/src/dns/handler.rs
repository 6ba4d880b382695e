//! The request handler: answers from the cluster zone, forwards the rest, and counts.
//!
//! It implements hickory's [`RequestHandler`], so it knows nothing of sockets: the transports
//! in [`super::server`] hand it a parsed [`Request`] and a [`ResponseHandler`] to answer into.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use hickory_proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use metrics::{Counter, Histogram};
use tracing::{debug, Instrument};

use super::forward::{ForwardError, Forwarder, Source, UDP_PAYLOAD};
use super::index::ClusterIndex;

pub struct DnsHandler {
    index: Arc<ClusterIndex>,
    forwarder: Forwarder,
}

/// A response before encoding.
struct Reply {
    metadata: Metadata,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    source: Origin,
}

/// Who produced an answer (the `source` label of the latency histogram).
#[derive(Clone, Copy)]
enum Origin {
    /// The cluster zone.
    Cluster,
    /// The forwarding cache.
    Cache,
    /// An upstream server (or the failure to reach one).
    Upstream,
    /// Refused or malformed before any lookup.
    Local,
}

impl DnsHandler {
    pub fn new(index: Arc<ClusterIndex>, forwarder: Forwarder) -> Self {
        DnsHandler { index, forwarder }
    }

    async fn reply(&self, request: &Request) -> Reply {
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = !self.forwarder.upstreams().is_empty();
        let mut reply = Reply {
            metadata,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            source: Origin::Local,
        };
        let fail = |mut reply: Reply, code| {
            reply.metadata.response_code = code;
            reply
        };
        if request.metadata.op_code != OpCode::Query {
            return fail(reply, ResponseCode::NotImp);
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return fail(reply, ResponseCode::BADVERS);
        }
        let [query] = request.queries.queries() else {
            return fail(reply, ResponseCode::FormErr);
        };
        let (name, qtype, class) = (query.name(), query.query_type(), query.query_class());
        if !matches!(class, DNSClass::IN | DNSClass::ANY)
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR | RecordType::OPT)
        {
            return fail(reply, ResponseCode::Refused);
        }
        if let Some(lookup) = self.index.lookup(name, qtype) {
            reply.source = Origin::Cluster;
            reply.metadata.authoritative = true;
            if lookup.nxdomain {
                reply.metadata.response_code = ResponseCode::NXDomain;
            }
            reply.answers = lookup.answers;
            reply.authorities.extend(lookup.authority);
            reply.additionals = lookup.additionals;
            if let Some(target) = lookup.chase {
                self.chase(&mut reply, &target, qtype, class).await;
            }
            return reply;
        }
        if self.forward(&mut reply, name, qtype, class).await.is_err() {
            return fail(reply, ResponseCode::Refused);
        }
        reply
    }

    /// Completes a CNAME (an ExternalName Service) whose target is outside the cluster: what
    /// the upstreams say about the target follows the CNAME, as a recursive server answers.
    /// Without upstreams the CNAME stands alone.
    async fn chase(&self, reply: &mut Reply, target: &Name, qtype: RecordType, class: DNSClass) {
        let _ = self
            .forward(reply, &LowerName::new(target), qtype, class)
            .await;
    }

    /// Asks the upstreams (or the cache) about `name` and adds their answer to `reply`, after
    /// what it holds; SERVFAIL (and nothing else) when none answers. `Err` without upstreams.
    async fn forward(
        &self,
        reply: &mut Reply,
        name: &LowerName,
        qtype: RecordType,
        class: DNSClass,
    ) -> Result<(), NoUpstreams> {
        let span = tracing::debug_span!("forward", name = %name, qtype = %qtype);
        match self
            .forwarder
            .resolve(name, qtype, class)
            .instrument(span)
            .await
        {
            Ok((answer, source)) => {
                reply.source = match source {
                    Source::Cache => {
                        cache_hits().increment(1);
                        Origin::Cache
                    }
                    Source::Upstream => Origin::Upstream,
                };
                reply.metadata.response_code = answer.rcode;
                reply.answers.extend(answer.answers);
                reply.authorities = answer.authorities;
                reply.additionals.extend(answer.additionals);
            }
            Err(ForwardError::NoUpstreams) => return Err(NoUpstreams),
            Err(e) => {
                debug!(name = %name, qtype = %qtype, error = %e, "forwarding failed");
                reply.source = Origin::Upstream;
                reply.metadata.response_code = ResponseCode::ServFail;
                reply.answers.clear();
                reply.additionals.clear();
            }
        }
        Ok(())
    }
}

/// Forwarding is off (`dns.upstreams = []`).
struct NoUpstreams;

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let reply = self.reply(request).await;
        // Clients that speak EDNS get it back, with the payload size this server accepts.
        let edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(UDP_PAYLOAD);
            e
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let message = builder.build(
            reply.metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        let info = match response_handle.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "cannot send a DNS response");
                let mut metadata = reply.metadata;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        };
        let qtype = request.queries.queries().first().map(|q| q.query_type());
        record(qtype, info.response_code, reply.source, started);
        info
    }
}

const TYPES: [(RecordType, &str); 13] = [
    (RecordType::A, "A"),
    (RecordType::AAAA, "AAAA"),
    (RecordType::SRV, "SRV"),
    (RecordType::PTR, "PTR"),
    (RecordType::SOA, "SOA"),
    (RecordType::NS, "NS"),
    (RecordType::CNAME, "CNAME"),
    (RecordType::MX, "MX"),
    (RecordType::TXT, "TXT"),
    (RecordType::ANY, "ANY"),
    (RecordType::HTTPS, "HTTPS"),
    (RecordType::SVCB, "SVCB"),
    (RecordType::CAA, "CAA"),
];
/// Label values beyond the known types, so the series stay bounded whatever clients send.
const OTHER_TYPE: &str = "other";
const NO_QUESTION: &str = "none";

const RESULTS: [(ResponseCode, &str); 6] = [
    (ResponseCode::NoError, "NOERROR"),
    (ResponseCode::NXDomain, "NXDOMAIN"),
    (ResponseCode::ServFail, "SERVFAIL"),
    (ResponseCode::Refused, "REFUSED"),
    (ResponseCode::FormErr, "FORMERR"),
    (ResponseCode::NotImp, "NOTIMP"),
];
const OTHER_RESULT: &str = "other";

const N_TYPES: usize = TYPES.len() + 2;
const N_RESULTS: usize = RESULTS.len() + 1;

fn type_index(qtype: Option<RecordType>) -> (usize, &'static str) {
    match qtype {
        None => (TYPES.len() + 1, NO_QUESTION),
        Some(t) => TYPES
            .iter()
            .position(|(k, _)| *k == t)
            .map_or((TYPES.len(), OTHER_TYPE), |i| (i, TYPES[i].1)),
    }
}

fn result_index(code: ResponseCode) -> (usize, &'static str) {
    RESULTS
        .iter()
        .position(|(k, _)| *k == code)
        .map_or((RESULTS.len(), OTHER_RESULT), |i| (i, RESULTS[i].1))
}

/// Counter and histogram handles, made once per label set (the registry lookup is the costly
/// part of recording a metric).
static QUERIES: [[OnceLock<Counter>; N_RESULTS]; N_TYPES] =
    [const { [const { OnceLock::new() }; N_RESULTS] }; N_TYPES];
static DURATIONS: [OnceLock<Histogram>; 4] = [const { OnceLock::new() }; 4];
static CACHE_HITS: OnceLock<Counter> = OnceLock::new();

fn cache_hits() -> &'static Counter {
    CACHE_HITS.get_or_init(|| metrics::counter!("edgemesh_dns_cache_hits_total"))
}

/// Counts one answered query: `edgemesh_dns_queries_total{type,result}` and
/// `edgemesh_dns_query_duration_seconds{source}`.
fn record(qtype: Option<RecordType>, code: ResponseCode, origin: Origin, started: Instant) {
    let (t, type_label) = type_index(qtype);
    let (r, result_label) = result_index(code);
    QUERIES[t][r]
        .get_or_init(|| {
            metrics::counter!("edgemesh_dns_queries_total", "type" => type_label, "result" => result_label)
        })
        .increment(1);
    let (i, source) = match origin {
        Origin::Cluster => (0, "cluster"),
        Origin::Cache => (1, "cache"),
        Origin::Upstream => (2, "upstream"),
        Origin::Local => (3, "local"),
    };
    DURATIONS[i]
        .get_or_init(
            || metrics::histogram!("edgemesh_dns_query_duration_seconds", "source" => source),
        )
        .record(started.elapsed().as_secs_f64());
}

/// Counts a message turned away before it reached the handler (FORMERR, NOTIMP).
pub fn record_rejected(code: ResponseCode, started: Instant) {
    record(None, code, Origin::Local, started);
}
