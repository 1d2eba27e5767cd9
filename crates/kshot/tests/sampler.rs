mod common;

use std::collections::HashSet;

use kshot::data::{EpisodeDraw, EpisodeSampler, EpisodeSpec, Grouping};

#[test]
fn episodes_are_deterministic_in_seed_and_index() {
    let set = common::synthetic_set(30, 3, 20, 8, 1);
    let s = EpisodeSampler::new(&set, EpisodeSpec::new(5, 2, 3), Grouping::Any).unwrap();
    assert_eq!(s.draw(7, 3), s.draw(7, 3));
    assert_ne!(s.draw(7, 3), s.draw(7, 4));
    assert_ne!(s.draw(7, 3), s.draw(8, 3));
}

#[test]
fn episodes_have_distinct_classes_and_disjoint_images() {
    let set = common::synthetic_set(30, 3, 20, 8, 1);
    let spec = EpisodeSpec::new(5, 2, 3);
    let s = EpisodeSampler::new(&set, spec, Grouping::Any).unwrap();
    for i in 0..200 {
        let d = s.draw(0, i);
        assert_eq!(d.classes.len(), 5);
        assert_eq!(d.classes.iter().collect::<HashSet<_>>().len(), 5);
        assert_eq!(d.support.len(), 10);
        assert_eq!(d.query.len(), 15);
        // label-major: the images of label l come from classes[l]
        for (j, &(c, _)) in d.support.iter().enumerate() {
            assert_eq!(c, d.classes[j / 2]);
        }
        for (j, &(c, _)) in d.query.iter().enumerate() {
            assert_eq!(c, d.classes[j / 3]);
        }
        let all: HashSet<_> = d.support.iter().chain(&d.query).collect();
        assert_eq!(all.len(), 25, "support and query must not share an image");
    }
}

#[test]
fn labels_are_shuffled_and_classes_cover_the_set() {
    let set = common::synthetic_set(10, 1, 20, 8, 1);
    let s = EpisodeSampler::new(&set, EpisodeSpec::new(10, 1, 1), Grouping::Any).unwrap();
    // With all 10 classes in every episode, only the label order varies.
    let orders: HashSet<Vec<usize>> = (0..50).map(|i| s.draw(0, i).classes).collect();
    assert!(
        orders.len() > 40,
        "label order must be random per episode, got {} distinct",
        orders.len()
    );
    let s5 = EpisodeSampler::new(&set, EpisodeSpec::new(5, 1, 1), Grouping::Any).unwrap();
    let mut first_label = [0usize; 10];
    for i in 0..2000 {
        first_label[s5.draw(0, i).classes[0]] += 1;
    }
    for (c, &n) in first_label.iter().enumerate() {
        assert!(
            (120..=280).contains(&n),
            "class {c} took label 0 in {n} of 2000 episodes (expect ~200)"
        );
    }
}

#[test]
fn within_group_episodes_use_one_group() {
    let set = common::synthetic_set(40, 4, 20, 8, 1);
    let s = EpisodeSampler::new(&set, EpisodeSpec::new(5, 1, 1), Grouping::WithinGroup).unwrap();
    let mut groups_seen = HashSet::new();
    for i in 0..100 {
        let d = s.draw(3, i);
        let groups: HashSet<&str> =
            d.classes.iter().map(|&c| set.classes[c].group.as_str()).collect();
        assert_eq!(groups.len(), 1);
        groups_seen.extend(groups);
    }
    assert_eq!(groups_seen.len(), 4);
}

#[test]
fn materialised_episode_matches_the_draw() {
    let set = common::synthetic_set(12, 1, 20, 6, 2);
    let s = EpisodeSampler::new(&set, EpisodeSpec::new(3, 2, 4), Grouping::Any).unwrap();
    let ep = s.episode(5, 9, &kshot::Device::Cpu).unwrap();
    let d = s.draw(5, 9);
    assert_eq!(ep.support.dims(), &[6, 1, 6, 6]);
    assert_eq!(ep.query.dims(), &[12, 1, 6, 6]);
    assert_eq!(ep.support_labels, vec![0, 0, 1, 1, 2, 2]);
    assert_eq!(ep.query_labels, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
    let first: Vec<f32> = ep.query.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let (c, i) = d.query[0];
    let expect: Vec<f32> = set.image(c, i).iter().map(|&v| v as f32 / 255.0).collect();
    assert_eq!(first, expect);
}

#[test]
fn too_few_images_names_the_class() {
    let mut set = common::synthetic_set(10, 1, 20, 4, 1);
    set.classes[3].pixels.truncate(16 * 5);
    let err = EpisodeSampler::new(&set, EpisodeSpec::new(5, 1, 5), Grouping::Any)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("g0/c3") && err.contains("5 images") && err.contains("6 per class"),
        "{err}"
    );
    assert!(!err.contains('\n'));
    EpisodeSampler::new(&set, EpisodeSpec::new(5, 1, 4), Grouping::Any).unwrap();
}

#[test]
fn too_many_ways_names_the_numbers() {
    let set = common::synthetic_set(10, 2, 20, 4, 1);
    let err = EpisodeSampler::new(&set, EpisodeSpec::new(11, 1, 1), Grouping::Any)
        .unwrap_err()
        .to_string();
    assert!(err.contains("10 classes") && err.contains("11-way"), "{err}");
    let err = EpisodeSampler::new(&set, EpisodeSpec::new(6, 1, 1), Grouping::WithinGroup)
        .unwrap_err()
        .to_string();
    assert!(err.contains("6 classes") && err.contains("largest has 5"), "{err}");
}

/// The exact classes and images of the first episodes under one seed, pinned: "the same episodes
/// on every machine" (any change to the RNG, its streams or the draw order fails here).
#[test]
fn golden_episodes_are_pinned() {
    let set = common::synthetic_set(30, 3, 12, 4, 1);
    let sampler = EpisodeSampler::new(&set, EpisodeSpec::new(3, 2, 1), Grouping::Any).unwrap();
    let draw = |classes: [usize; 3], support: [(usize, usize); 6], query: [(usize, usize); 3]| {
        EpisodeDraw {
            classes: classes.to_vec(),
            support: support.to_vec(),
            unlabelled: vec![],
            query: query.to_vec(),
            rotations: vec![],
        }
    };
    let golden = [
        draw(
            [4, 28, 19],
            [(4, 4), (4, 3), (28, 11), (28, 3), (19, 1), (19, 11)],
            [(4, 7), (28, 7), (19, 3)],
        ),
        draw(
            [18, 5, 20],
            [(18, 4), (18, 5), (5, 10), (5, 0), (20, 7), (20, 8)],
            [(18, 10), (5, 3), (20, 1)],
        ),
        draw(
            [8, 9, 5],
            [(8, 10), (8, 11), (9, 10), (9, 2), (5, 3), (5, 6)],
            [(8, 1), (9, 5), (5, 1)],
        ),
    ];
    for (i, want) in golden.iter().enumerate() {
        assert_eq!(&sampler.draw(42, i as u64), want, "episode {i} under seed 42");
    }
    let grouped =
        EpisodeSampler::new(&set, EpisodeSpec::new(3, 1, 1), Grouping::WithinGroup).unwrap();
    let want = EpisodeDraw {
        classes: vec![22, 7, 16],
        support: vec![(22, 7), (7, 10), (16, 9)],
        unlabelled: vec![],
        query: vec![(22, 4), (7, 0), (16, 3)],
        rotations: vec![],
    };
    assert_eq!(grouped.draw(7, 5), want, "a within-group episode (classes 22, 7, 16: group 1)");
}

#[test]
fn task_rotations_turn_all_images_of_a_class_alike_and_use_all_four_turns() {
    use kshot::data::omniglot::rotate_ccw;
    // 8 classes of 6 distinct, asymmetric 5×5 images.
    let n = 5;
    let classes = (0..8)
        .map(|c| kshot::data::Class {
            name: format!("c{c}"),
            group: "g".into(),
            pixels: (0..6 * n * n).map(|i| ((i * 7 + c * 31) % 251) as u8).collect(),
        })
        .collect();
    let set = kshot::data::ImageSet { name: "t".into(), channels: 1, height: n, width: n, classes };
    let spec = EpisodeSpec::new(3, 2, 2);
    let plain = EpisodeSampler::new(&set, spec, Grouping::Any).unwrap();
    let rotating = plain.clone().with_task_rotations(true).unwrap();
    let mut seen = [false; 4];
    for i in 0..20 {
        let (a, b) = (plain.draw(1, i), rotating.draw(1, i));
        assert_eq!((&a.classes, &a.support, &a.query), (&b.classes, &b.support, &b.query));
        assert_eq!(b.rotations.len(), 3);
        let ep = rotating.episode(1, i, &candle_core::Device::Cpu).unwrap();
        let got = |t: &candle_core::Tensor, k: usize| -> Vec<u8> {
            let v = t.get(k).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| (x * 255.0).round() as u8).collect()
        };
        for (k, &(class, img)) in b.support.iter().enumerate() {
            let turns = b.rotations[k / 2];
            seen[turns as usize] = true;
            assert_eq!(got(&ep.support, k), rotate_ccw(set.image(class, img), n, turns));
        }
        for (k, &(class, img)) in b.query.iter().enumerate() {
            assert_eq!(got(&ep.query, k), rotate_ccw(set.image(class, img), n, b.rotations[k / 2]));
        }
    }
    assert!(
        seen.iter().all(|&s| s),
        "20 episodes of 3 classes never drew some quarter turn: {seen:?}"
    );
    let wide = kshot::data::ImageSet { height: 1, width: 25, ..set.clone() };
    assert!(EpisodeSampler::new(&wide, spec, Grouping::Any)
        .unwrap()
        .with_task_rotations(true)
        .is_err());
}
