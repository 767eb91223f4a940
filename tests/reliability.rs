//! The reliability campaign, small N: `smudge bench reliability
//! --quick` must count no lost page, no panic, and a clear error for every
//! bad input (`smudge bench reliability` runs the large-N campaign).

use smudge_testkit::*;

#[test]
fn the_small_campaign_loses_nothing_and_never_panics() {
    require_kvm();
    let out = smudge().args(["bench", "reliability", "--quick", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let goal = |name: &str| {
        r["goals"].as_array().unwrap().iter().find(|g| g["name"] == name).unwrap_or_else(|| panic!("{name}: {r}"))
            ["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(goal("lost pages"), 0.0, "{r}");
    assert_eq!(goal("panics"), 0.0, "{r}");
    assert_eq!(goal("bad inputs answered with a clear error (share)"), 1.0, "{r}");
    let trials =
        r["results"].as_array().unwrap().iter().find(|x| x["case"] == "all").unwrap()["value"].as_f64().unwrap();
    assert!(trials >= 150.0, "{r}");
    // Each hostile TLS peer (garbage, a damaged or a cut stream, a stall
    // after the handshake) was refused by name, its memory file gone.
    let tls = |metric: &str| {
        r["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["case"] == "hostile TLS peers" && x["metric"] == metric)
            .unwrap_or_else(|| panic!("hostile TLS peers {metric}: {r}"))["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!([tls("trials"), tls("clear_errors"), tls("lost_pages"), tls("panics")], [4.0, 4.0, 0.0, 0.0], "{r}");
}
