"""Stage extract_resnet_features: every captioned image -> one feature row from the frozen backbone
(features.backbone: ResNet-50 by default, or EfficientNet-Lite0)."""
from captioning import files, layout
from captioning.errors import run_stage
from captioning.params import read_params, read_section


def main() -> None:
    images_dir = read_params("data.images")["data"]["images"]
    options = read_section("features")
    layout.require(layout.IMAGE_LIST)
    from captioning.backbones import make_spec  # TensorFlow only past the checks above
    from captioning.features import extract_features

    spec = make_spec(options.weights, options.seed, options.image_size, options.precision, options.backbone)
    images = layout.read_image_list()
    engine = None
    if options.engine == "ray":
        from captioning.extract_ray import RayEngine

        engine = RayEngine(spec, options.batch_size, options.ray_address)
    report = extract_features(images, images_dir, layout.FEATURES_DIR, spec, options.batch_size,
                              compute_rows=engine, engine_report=engine.summary if engine else None)
    files.write_json(layout.EXTRACT_REPORT, report)
    on = f", on Ray: {report['engine']['workers']} workers" if engine else ""
    print(f"{report['images_extracted']} images -> features ({report['images_per_second']} images/s{on}, "
          f"{spec.backbone}, weights: {spec.weights}); {report['failed_count']} failed (listed in "
          f"{layout.EXTRACT_REPORT})")


if __name__ == "__main__":
    run_stage(main, __doc__)
