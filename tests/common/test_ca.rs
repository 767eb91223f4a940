//! A test PKI for migrations over TLS: a CA made by the test (`rcgen`) and
//! credentials directories in QEMU's layout that trust it.

use std::path::Path;

/// A test CA and what signs with it.
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    /// A self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Ca { cert: p.self_signed(&key).unwrap(), key }
    }

    /// A credentials directory at `dir` trusting this CA, with a server
    /// certificate for `names` and a client one, both signed by it.
    pub fn creds(&self, dir: &Path, names: &[&str]) -> String {
        self.creds_signed_by(dir, names, self)
    }

    /// A credentials directory at `dir` trusting this CA, with a server
    /// certificate for `names` and a client one, both signed by `signer`
    /// (another CA: certificates this one does not vouch for).
    pub fn creds_signed_by(&self, dir: &Path, names: &[&str], signer: &Ca) -> String {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), self.cert.pem()).unwrap();
        for (who, names) in [("server", names), ("client", &["source"][..])] {
            let k = rcgen::KeyPair::generate().unwrap();
            let p = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
            let c = p.signed_by(&k, &signer.cert, &signer.key).unwrap();
            std::fs::write(dir.join(format!("{who}-cert.pem")), c.pem()).unwrap();
            std::fs::write(dir.join(format!("{who}-key.pem")), k.serialize_pem()).unwrap();
        }
        dir.to_str().unwrap().to_string()
    }
}
